"""Exact k nearest neighbours in chunks: memory bounded by the chunk sizes, not the index size.

The index rows (an array or a read-only memmap of features on disk) are read once, a chunk at
a time; the queries are held in memory, normalized once, and each chunk's similarities merged
into the running top k. A million index rows of any width search in the memory of one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import progress_bar
from .options import METRICS

#: Index rows compared at once (a chunk of this many rows times the queries in one block).
INDEX_CHUNK = 8192
QUERY_CHUNK = 2048


@dataclass
class Neighbours:
    """For each query, its k nearest index rows, nearest first: `indices` (Q, k) int64 and
    `similarity` (cosine similarity; for the euclidean metric, minus the distance)."""

    indices: np.ndarray
    similarity: np.ndarray

    def distance(self, metric: str) -> np.ndarray:
        """(Q, k) distances: 1 - cosine similarity, or the euclidean distance."""
        return 1.0 - self.similarity if metric == "cosine" else -self.similarity


def _prepare(x: np.ndarray, metric: str) -> torch.Tensor:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # a memmap's rows are read-only
    if metric == "cosine":
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return t


def _similarity(q: torch.Tensor, x: torch.Tensor, metric: str, q_sq: torch.Tensor | None) -> torch.Tensor:
    """(Bq, Bx) similarities: cosine, or minus the euclidean distance (larger is nearer either way)."""
    dots = q @ x.T
    if metric == "cosine":
        return dots
    assert q_sq is not None
    sq = (q_sq[:, None] - 2 * dots + x.pow(2).sum(1)[None, :]).clamp_min_(0)
    return sq.sqrt_().neg_()


def nearest(
    queries: np.ndarray,
    index,
    k: int,
    *,
    metric: str = "cosine",
    exclude: np.ndarray | None = None,
    index_chunk: int = INDEX_CHUNK,
    progress: bool = False,
) -> Neighbours:
    """The `k` nearest rows of `index` (N, d) to each row of `queries` (Q, d), exactly.

    Parameters
    ----------
    queries : array (Q, d)
    index : array or memmap (N, d)
        Read `index_chunk` rows at a time.
    k : int
        Neighbours per query (at most N; fewer index rows give fewer).
    metric : {"cosine", "euclidean"}
    exclude : array (Q,), optional
        An index row to leave out for each query (-1: none): leave-one-out when the queries
        are index rows themselves.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}: choose from {', '.join(METRICS)}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    n, q_count = len(index), len(queries)
    if queries.shape[1:] != index.shape[1:]:
        raise ConfigError(f"queries have {queries.shape[1]} features but the index has {index.shape[1]}")
    k_eff = min(k, n - (1 if exclude is not None else 0)) if n else 0
    if k_eff < 1:
        raise ConfigError(f"the index has {n} rows: too few for {k} neighbours")
    q = _prepare(queries, metric)
    q_sq = q.pow(2).sum(1) if metric == "euclidean" else None
    best = torch.full((q_count, k_eff), -float("inf"))
    best_idx = torch.zeros((q_count, k_eff), dtype=torch.int64)
    skip = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64))
    with progress_bar(progress, n, unit="row", desc="neighbours") as bar:
        for start in range(0, n, index_chunk):
            x = _prepare(index[start : start + index_chunk], metric)
            for qs in range(0, q_count, QUERY_CHUNK):
                rows = slice(qs, qs + QUERY_CHUNK)
                sims = _similarity(q[rows], x, metric, None if q_sq is None else q_sq[rows])
                if skip is not None:
                    own = skip[rows] - start
                    hit = (own >= 0) & (own < len(x))
                    sims[hit.nonzero().squeeze(1), own[hit]] = -float("inf")
                _merge(best, best_idx, rows, sims, start, k_eff)
            bar.update(len(x))
    return Neighbours(best_idx.numpy(), best.numpy())


def _merge(best: torch.Tensor, best_idx: torch.Tensor, rows: slice, sims: torch.Tensor, start: int, k: int) -> None:
    """The running top k of the query rows `rows`, merged with one chunk's similarities."""
    top, where = sims.topk(min(k, sims.shape[1]), dim=1)
    cand = torch.cat([best[rows], top], dim=1)
    cand_idx = torch.cat([best_idx[rows], where + start], dim=1)
    keep, order = cand.topk(k, dim=1)
    best[rows] = keep
    best_idx[rows] = cand_idx.gather(1, order)


def knn_distance(neighbours: Neighbours, metric: str) -> np.ndarray:
    """Each query's mean distance to its k nearest index rows (the k-NN anomaly score)."""
    return neighbours.distance(metric).mean(1)
