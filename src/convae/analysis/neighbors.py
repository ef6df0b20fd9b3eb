"""Similar images: the k index images nearest to each query by cosine similarity of any layer's
pooled features, exactly, in chunks (the index features are kept on disk when a work folder is
given, so a million index rows search in bounded memory); precision@k against labels, beside
raw pixels and the same architecture with random weights."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_open
from ..data.index import SourceIndex
from ..errors import ConfigError
from ..features import FeatureExtractor
from ..features.plan import check_compile, check_precision
from ..tensors import allow_bf16, device_of, evenly_spaced
from .knn import Neighbours, nearest
from .options import NEIGHBOR_BASELINES, check_k, middle_layer
from .score import feature_matrix

#: An untrained model's batch-norm statistics come from up to this many index images.
CALIBRATION_IMAGES = 10_000


class PixelFeatures:
    """Raw pixels in [0, 1] as features, one row per image (a FeatureExtractor's interface)."""

    def __init__(self, image_shape: Sequence[int], batch_size: int = 1024):
        self.dim = int(np.prod(image_shape))
        self.batch_size = batch_size

    def batches(self, images, start: int = 0):
        for s in range(start, len(images), self.batch_size):
            block = np.asarray(images[s : s + self.batch_size])
            yield s, block.reshape(len(block), -1).astype(np.float32) / 255

    def transform(self, images, progress: bool = False) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for s, feats in self.batches(images):
            out[s : s + len(feats)] = feats
        return out


@dataclass
class NeighborResult:
    """Each query's k nearest index images (`neighbours`: rows of the index, nearest first, with
    their cosine similarity), the sources of both sets, and precision@k by feature set."""

    neighbours: Neighbours
    query_index: SourceIndex
    index_index: SourceIndex
    features: str  # "layers/pool"
    precision: dict[str, float] = field(default_factory=dict)


def same_labels(query: SourceIndex, index: SourceIndex) -> tuple[np.ndarray, np.ndarray] | None:
    """(query labels, index labels) in one label space (by class name when both have names), or
    None when either set has no labels."""
    if query.labels is None or index.labels is None:
        return None
    if query.classes and index.classes:
        names = {name: i for i, name in enumerate(index.classes)}
        q = np.array([names.get(n, -1 - i) for i, n in enumerate(query.class_names())])  # unknown class: no match
        return q, np.asarray(index.labels)
    return np.asarray(query.labels), np.asarray(index.labels)


def precision_at_k(neighbours: Neighbours, query_labels: np.ndarray, index_labels: np.ndarray) -> float:
    """Mean fraction of each query's k neighbours that share its label."""
    hits = index_labels[neighbours.indices] == np.asarray(query_labels)[:, None]
    return float(hits.mean())


def untrained_extractor(
    model, layers, pool, index_images, batch_size, seed: int = 0, precision: str = "auto", compile: str = "auto"
) -> FeatureExtractor:
    """The same architecture untrained, its data statistics measured on the index images (no gradient step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = type(model)(model.config).to(device_of(model))
    ex = FeatureExtractor(
        untrained, layers, pool, device=device_of(model), batch_size=batch_size, precision=precision, compile=compile
    )
    rows = evenly_spaced(np.arange(len(index_images)), CALIBRATION_IMAGES)
    untrained.calibrate(index_images, rows, ex.layers, ex.batch_size)
    untrained.eval()
    return ex


def find_neighbors(
    model,
    index_data,
    query_data,
    *,
    layers: str | None = None,
    pool: str = "grid4",
    k: int = 10,
    baselines: Sequence[str] = NEIGHBOR_BASELINES,
    work_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    precision: str = "auto",
    compile: str = "auto",
) -> NeighborResult:
    """The `k` index images most similar to each query image (cosine similarity of the features of
    `layers` under `pool`), exactly.

    `layers` None is the middle depth (:func:`convae.analysis.options.middle_layer`).
    `index_data` and `query_data` are ImageData (or image arrays) of the model's shape. With
    labels on both, precision@k is measured for the model's features and each of `baselines`
    (``pixels``, ``random``: the same architecture untrained). `work_dir` keeps the index
    features on disk while searching (default: in memory). `precision` "float32" keeps every
    product fp32 (the same neighbours on every machine); "auto" lets the hierarchical models use
    bf16 where native. `compile`: the extractions through ``torch.compile`` ("auto": for 10,000
    images or more; "always"; "never").
    """
    check_k(k)
    check_precision(precision)
    check_compile(compile)
    unknown = [b for b in baselines if b not in NEIGHBOR_BASELINES]
    if unknown:
        raise ConfigError(f"--baselines {unknown[0]}: choose from {', '.join(NEIGHBOR_BASELINES)} (or none)")
    index_images, query_images = getattr(index_data, "images", index_data), getattr(query_data, "images", query_data)
    layers = layers or middle_layer(model)
    ex = FeatureExtractor(
        model, layers, pool, device=device_of(model), batch_size=batch_size, precision=precision, compile=compile
    )
    found = _search(ex, index_images, query_images, k, work_dir, "index", progress)
    result = NeighborResult(found, _index_of(query_data), _index_of(index_data), f"{layers}/{pool}")
    labels = same_labels(result.query_index, result.index_index)
    if labels is None:
        return result
    result.precision[f"convae/{layers}/{pool}"] = precision_at_k(found, *labels)
    for name in baselines:
        if name == "pixels":
            other = PixelFeatures(index_images.shape[1:])
        else:
            with allow_bf16(precision == "auto"):  # its calibration's products too
                other = untrained_extractor(
                    model, layers, pool, index_images, batch_size, precision=precision, compile=compile
                )
        key = "pixels" if name == "pixels" else f"random/{layers}/{pool}"
        result.precision[key] = precision_at_k(
            _search(other, index_images, query_images, k, work_dir, name, progress), *labels
        )
    return result


def _search(extractor, index_images, query_images, k: int, work_dir, name: str, progress: bool) -> Neighbours:
    ref = feature_matrix(extractor, index_images, work_dir, name=name, progress=progress)
    query = extractor.transform(query_images, progress=progress)
    try:
        return nearest(query, ref, k, metric="cosine", progress=progress)
    finally:
        if work_dir is not None:
            del ref
            (Path(work_dir) / f"{name}.npy").unlink(missing_ok=True)


def _index_of(data) -> SourceIndex:
    return data.source_index() if hasattr(data, "source_index") else SourceIndex.of_rows(len(data))


def write_neighbors(path: str | os.PathLike, result: NeighborResult) -> Path:
    """One CSV row per query and neighbour: the query's index, path and label, the rank, the
    neighbour's index, path and label, and their cosine similarity."""
    path = Path(path)
    q, x = result.query_index.columns(), result.index_index.columns()
    header = ["query_index", "query_path", "query_label", "rank", "index", "path", "label", "similarity"]
    blank = lambda v: "" if v is None else v  # noqa: E731
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, (rows, sims) in enumerate(zip(result.neighbours.indices, result.neighbours.similarity)):
            query = [q["index"][i], blank(q["path"][i]), blank(q["label"][i])]
            for rank, (j, s) in enumerate(zip(rows, sims), start=1):
                writer.writerow([*query, rank, x["index"][j], blank(x["path"][j]), blank(x["label"][j]), f"{s:.6f}"])
    return path


def neighbors_grid(result: NeighborResult, index_data, query_data, show: int = 8):
    """The picture of the first `show` queries and their neighbours (a matplotlib Figure)."""
    from ..views.neighbors import neighbors_figure

    count = min(show, len(result.neighbours.indices))
    rows = result.neighbours.indices[:count]
    index_images = getattr(index_data, "images", index_data)
    query_images = np.asarray(getattr(query_data, "images", query_data)[np.arange(count)])
    found = np.stack([np.asarray(index_images[r]) for r in rows])  # (count, k, H, W, C)
    labels = same_labels(result.query_index, result.index_index)
    same = None if labels is None else labels[1][rows] == labels[0][:count, None]
    names = [result.query_index.describe(i) for i in range(count)]
    title = f"query, then its {rows.shape[1]} nearest images by cosine similarity of {result.features}"
    if result.precision:
        title += f"\nprecision@{rows.shape[1]} over all {len(result.neighbours.indices):,} queries: "
        title += ", ".join(f"{n} {p:.3f}" for n, p in result.precision.items())
    return neighbors_figure(
        query_images, found, result.neighbours.similarity[:count], query_names=names, same=same, title=title
    )
