"""Linear classifiers fitted by streaming the feature matrix: bounded memory, one read of it per step.

``make_pipeline(StandardScaler(), LogisticRegression())`` on a probe's train features (CIFAR-10
with mirrors: 100,000 x 12,800 float32, 5 GB) holds three copies of the matrix (the features,
the scaler's output, scikit-learn's own copy) and reads the float32 matrix twice in every
L-BFGS step. What no library does is the pass this module is built around:

- the standardization is folded into the weights (``X @ (W / scale).T + (b - (W / scale) @ mean)``),
  so no standardized copy exists, and X may be a read-only float16 memmap: a chunk of rows at a
  time is converted to float32, small enough to stay in the cache; so is a whitening
  (``whiten=``), through the Cholesky factor of the covariance (:class:`_Basis`);
- each evaluation of the objective and its gradient is one pass over the rows: a chunk's
  scores, softmax (or hinge), loss and gradient contribution ``residual.T @ chunk`` are all
  computed while the chunk is in cache, the two small matrix products in torch;
- the chunks are shared out to worker threads by contiguous groups, each group summing its own
  gradient; the groups are added in a fixed order, so a fit is deterministic whatever thread
  runs which group. Threads each running one-threaded torch ops beat torch's own two-thread
  ops here: an OpenMP barrier per small op stalls whenever the machine is busy
  (benchmarks/linear_probe.py measures both, ``--threads-mode``);
- scipy's L-BFGS-B drives the optimization with scikit-learn's options (gtol, ftol, maxls) on
  the same objective, so it stops where ``LogisticRegression(solver="lbfgs")`` does; it asks for
  one evaluation per step unless its line search needs more (about 1.05 passes a step measured),
  which no hand-written line search would beat;
- with ``precondition=True`` it steps in the coordinates of a whitening of blocks of columns
  (:class:`_BlockBasis`): the same objective and minimum, and on wide correlated features far
  fewer passes to reach them (scikit-learn has no preconditioned lbfgs).

What bounds a pass: it reads each value of X once (2 bytes in float16) and spends 4 k flops on
it (the two products, k classes). MKL runs these skinny products at 30-60 GFLOP/s a core, so
on a 2-core machine a float16 pass with 10 classes is bound by the cores, several times a copy
of the same bytes, float32 about twice; the chunks are already read once. With more cores per
memory channel, or on a GPU, the same pass meets the bandwidth. bfloat16 products (AMX, through
oneDNN) were no faster at these shapes and put 0.2% errors in the scores: not used. 8-bit
codes (uint8) run both products on exact int8 products instead (:mod:`.int8`), about 1.3x as fast.
``benchmarks/linear_probe.py --compute-only`` measures which bound a machine hits.

``device="cuda"`` runs the same pass on a GPU, the matrix uploaded once in its own dtype when it
fits in half the free GPU memory, else streamed through pinned buffers on every pass.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import cholesky
from scipy.linalg.blas import ssyrk
from scipy.linalg.lapack import strtri
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from ..tensors import bf16_products
from . import int8

__all__ = ["StreamingLinearSVM", "StreamingLogisticRegression"]

# accepted as they are (uint8: the probe's 8-bit codes); anything else becomes float32
_DTYPES = (np.float32, np.float16, np.float64, np.uint8)
# a converted float32 chunk: 4 MiB, so each worker's chunk stays in the L3 cache between its two
# products (32 MiB shared by 2 cores on the host measured). With the scores computed k rows first
# (see _Objective._group), passes at 32,000 columns ran 1.7x as fast on 32-row chunks as on 128
# (the best before that change), and 96-128 rows at 9,600 and 256-512 at 2,048 columns were within
# the host's noise of each other (benchmarks/linear_probe.py --chunk-rows, 2 workers, 2026-12-06)
_CHUNK_BYTES = 4 << 20
_ROWS_FIRST_CHUNKS = 4  # chunks of 4 x _CHUNK_BYTES where the scores are computed rows first (_pass_layout)
_MIN_CHUNK_ROWS = 16  # skinnier products cost more than the cache misses they save (16 rows: 1.15x slower than 32)
_MAX_GROUPS = 16  # gradient partial sums per pass (a k x d float32 matrix each)
_GROUP_BYTES = 256 << 20  # ... but no more memory than this for all of them together
_THREADS_FROM_BYTES = 32 << 20  # the smallest X whose passes are shared out to threads by default
_PREDICT_BYTES = 16 << 20  # rows scored at a time by decision_function, in float64
# the whitening's covariance from bf16 products (where native) from this many columns: below it
# one tile is the whole product, twice syrk's work, and bf16 gains nothing over float32's syrk
_BF16_COVARIANCE_COLUMNS = 4096
# bf16 rows a block of the covariance (transposed: d x rows): the tile products' inner dimension.
# 128 MiB (2,995 rows at 22,400 columns): the mnist preset's covariance of 60,000 rows 19.7-21.8 s
# against 25.6-27.3 s with 32 MiB (749 rows), in turn twice on an Intel host with AMX; 256-512 MiB
# no faster (15,000 rows, scratch benchmark, 2026-12-07)
_BF16_BLOCK_BYTES = 128 << 20
_BF16_TILE_COLUMNS = 1600  # 1,600-2,400 within 10% of each other (9,600 columns, 1,748-3,496-row blocks)
# OpenBLAS's threaded spotrf, as scipy 1.17 bundles it, segfaults on matrices of about 26,700
# columns and more (26,000 passed at 2, 4, 8 and 16 threads; 26,700 and 28,800 crashed at 2:
# a whitened probe of 28,800 features took its process down). MKL's, through torch, factors in
# place too, 1.15x slower (9,600 and 26,000 columns: benchmarks/cholesky.py): only wider matrices take it.
_OPENBLAS_CHOLESKY_COLUMNS = 24_576
# the whitening's gain (_inverse_trace): exact up to this many columns (an inverse of 64 MB),
# estimated above it from this many probes
_EXACT_TRACE_COLUMNS = 4096
_TRACE_PROBES = 256  # a multiple of 64
_WHITEN_AUTO_ROWS = 20_000  # whiten_rows="auto": the covariance from this many rows (2 a column if more)
# precondition=True: L-BFGS steps in the coordinates of a whitening of blocks of consecutive
# columns, each block's covariance from 2 rows a column, evenly spaced, floored at
# _PRECONDITION_FLOOR x its mean variance; the blocks' factors take at most
# _PRECONDITION_BYTES (float32), so the widest feature sets get the narrowest blocks. On 40,000
# rows of the cifar10 preset's 32,000 standardized features (an Intel host with AMX, 2026-12-07,
# benchmarks/precondition.py [--block-columns N]): plain L-BFGS stopped at 300 steps (229 s);
# stopped by tol 1e-4, blocks of 1,032 columns (the default here) 91 steps (78 s), 2,048 73
# (65 s), 4,096 59 (62 s); in a scratch run the whole covariance whitened reached
# plain's 300-step objective in 38 (4 GB more memory, 2 minutes to factor it). 128 MB: the
# cifar10 preset's probe peaked at 8.4 GB with 4,096-column blocks (512 MB), 7.85 GB without
_PRECONDITION_BLOCK_COLUMNS = 4096  # at most
_PRECONDITION_MIN_COLUMNS = 256
_PRECONDITION_BYTES = 128 << 20
_PRECONDITION_FLOOR = 0.1


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(device)


def _torch_view(X: np.ndarray) -> torch.Tensor | None:
    """X as a tensor sharing its memory (a memmap stays a memmap), or None where torch can't."""
    if X.dtype.byteorder == ">" or any(s < 0 or s % X.itemsize for s in X.strides):
        return None
    with warnings.catch_warnings():
        # a read-only memmap: torch warns that writing would be undefined; nothing here writes
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(X)


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to `n` for the block (new worker threads: see _one_threaded_pool)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def _pass_layout(n: int, d: int, k: int, chunk_rows: int | None, on_gpu: bool) -> tuple[int, bool]:
    """Rows a chunk of a pass (`chunk_rows` unless None), and whether its scores are computed k
    rows first (:func:`_k_rows_first`; always on a GPU), for n x d rows and k classes.

    k rows first, chunks of _CHUNK_BYTES stay in the cache between the two products; rows first
    (MKL's faster order on an Intel host with AMX), chunks 4x as large ran 11-20% faster
    (2 workers, 9,600-32,000 columns; 8x: slower again; benchmarks/RESULTS.md).
    """
    base = max(_MIN_CHUNK_ROWS, (32 if on_gpu else 1) * _CHUNK_BYTES // (4 * max(d, 1)))
    rows = max(1, min(int(chunk_rows or base), n))
    if on_gpu:
        return rows, True
    k_rows_first = _k_rows_first(rows, d, k)
    if k_rows_first or chunk_rows is not None:
        return rows, k_rows_first
    return max(1, min(_ROWS_FIRST_CHUNKS * base, n)), False


def _one_threaded_pool(n_workers: int) -> ThreadPoolExecutor:
    """Worker threads whose torch ops (MKL's products included) run on one thread each.

    A new thread starts with OpenMP's default of one thread per core, whatever torch's setting:
    MKL then splits a wide product of each worker over all cores (2 workers x 2 threads on 2
    cores), and its sums, so its bits, depend on which thread called it. Call only where torch's
    threads are set to 1 already (the initializer sets torch's global count too).
    """
    return ThreadPoolExecutor(n_workers, initializer=torch.set_num_threads, initargs=(1,))


def _groups(n_rows: int, chunk_rows: int, n_groups: int) -> list[tuple[int, int]]:
    """`n_rows` cut into at most `n_groups` contiguous row ranges, each a whole number of chunks."""
    n_chunks = -(-n_rows // chunk_rows)
    n_groups = max(1, min(n_groups, n_chunks))
    cuts = [round(i * n_chunks / n_groups) * chunk_rows for i in range(n_groups + 1)]
    return [(a, min(b, n_rows)) for a, b in zip(cuts, cuts[1:]) if a < min(b, n_rows)]


class _Rows:
    """The feature matrix as float32 chunks of rows on the compute device, and the threads that share them.

    `map(fn)` calls ``fn(group, start, stop, chunks)`` for each row group, where `chunks` yields
    ``(start, stop, float32 tensor)`` for the group's chunks; results come back in group order.
    """

    def __init__(
        self, X: np.ndarray, device: torch.device, chunk_rows: int | None, n_threads: int, n_groups: int, k: int = 1
    ):
        self.X, self.device = X, device
        self.n, self.d = X.shape
        self.view = _torch_view(X)
        self.on_gpu = device.type != "cpu"
        self.chunk_rows, self.k_rows_first = _pass_layout(self.n, self.d, k, chunk_rows, self.on_gpu)
        # 8-bit codes: the objective's passes run on int8 products, in chunks of their own size
        self.code_rows = int8.chunk_rows(self.n, self.d, device, chunk_rows) if X.dtype == np.uint8 else 0
        self.n_threads = 1 if self.on_gpu else max(1, int(n_threads))
        self.groups = _groups(self.n, self.chunk_rows, 1 if self.on_gpu else n_groups)
        self._local = threading.local()
        self._device_copy = self._upload() if self.on_gpu else None
        self._pool = _one_threaded_pool(self.n_threads) if self.n_threads > 1 and len(self.groups) > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._device_copy, self._local = None, threading.local()  # the buffers go with them

    def map(self, fn, signed_codes: bool = False) -> list:
        """`signed_codes`: the chunks as int8 ``code - 128`` (8-bit codes only, see `code_rows`)."""
        chunks = self._signed_codes if signed_codes else self._chunks
        calls = [(g, a, b, chunks(a, b)) for g, (a, b) in enumerate(self.groups)]
        if self._pool is None:
            return [fn(*c) for c in calls]
        return list(self._pool.map(lambda c: fn(*c), calls))

    def host_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows of X as a CPU tensor in X's dtype: a view where torch can share X's memory."""
        if self.view is not None:
            return self.view[start:stop]
        return torch.from_numpy(np.ascontiguousarray(self.X[start:stop]))

    def _chunks(self, start: int, stop: int):
        for a in range(start, stop, self.chunk_rows):
            b = min(a + self.chunk_rows, stop)
            yield a, b, self._float32(a, b)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The calling thread's tensor `name`, made once (for a shape, dtype) and reused by every chunk."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def _signed_codes(self, start: int, stop: int):
        for a in range(start, stop, self.code_rows):
            b = min(a + self.code_rows, stop)
            buf = self.buffer("codes", (self.code_rows, self.d), torch.int8)
            yield a, b, int8.to_signed(self.host_rows(a, b), out=buf[: b - a])

    def _float32(self, start: int, stop: int) -> torch.Tensor:
        if self._device_copy is not None:
            return self._device_copy[start:stop].float()
        rows = self.host_rows(start, stop)
        if self.on_gpu:
            return self._stream(rows).float()
        if rows.dtype == torch.float32:
            return rows  # read in place by the matrix products: no copy at all
        out = self.buffer("float32", (self.chunk_rows, self.d), torch.float32)[: stop - start]
        out.copy_(rows)  # float16/float64/uint8 -> float32, while the chunk is in cache
        return out

    def _upload(self) -> torch.Tensor | None:
        """X copied once to the GPU in its own dtype, chunk by chunk, if it fits in half the free memory."""
        free, _ = torch.cuda.mem_get_info(self.device)
        if self.X.nbytes > free // 2:
            self._pinned = [
                torch.empty((self.chunk_rows, self.d), dtype=self.host_rows(0, 1).dtype).pin_memory() for _ in range(2)
            ]
            self._events: list[torch.cuda.Event | None] = [None, None]
            self._turn = 0
            return None
        out = torch.empty(self.X.shape, dtype=self.host_rows(0, 1).dtype, device=self.device)
        for a in range(0, self.n, self.chunk_rows):
            out[a : a + self.chunk_rows].copy_(self.host_rows(a, a + self.chunk_rows))
        return out

    def _stream(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` sent to the GPU through two pinned buffers, used in turn (a copy in flight is never overwritten)."""
        i, self._turn = self._turn, 1 - self._turn
        previous = self._events[i]
        if previous is not None:
            previous.synchronize()
        staged = self._pinned[i][: len(rows)]
        staged.copy_(rows)
        out = staged.to(self.device, non_blocking=True)
        copied = self._events[i] = torch.cuda.Event()
        copied.record()
        return out


def _column_stats(rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population variance of X in float64, in one pass (Chan et al.'s merge of chunks)."""

    def empty() -> tuple[int, torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(rows.d, dtype=torch.float64, device=rows.device)
        return 0, zeros, zeros.clone()

    # float64 copies of a few rows at a time: whole 128-row chunks made 32 MB temporaries at
    # 32,000 columns, which glibc then keeps in each thread's arena (0.47 GB more peak memory
    # for a 20,000-row fit, measured; the cifar10 preset's probe peaked 0.9 GB higher)
    step = max(1, _CHUNK_BYTES // (8 * max(rows.d, 1)))

    def group(_g, _a, _b, chunks):
        stats = empty()
        for _, _, x in chunks:
            for start in range(0, len(x), step):
                part = x[start : start + step].double()
                part_mean = part.mean(0)
                stats = _merge(*stats, len(part), part_mean, (part - part_mean).square_().sum(0))
        return stats

    count, mean, m2 = empty()
    for stats in rows.map(group):
        count, mean, m2 = _merge(count, mean, m2, *stats)
    return mean.cpu().numpy(), (m2 / count).cpu().numpy()


def _merge(n1: int, mean1: torch.Tensor, m2_1: torch.Tensor, n2: int, mean2: torch.Tensor, m2_2: torch.Tensor):
    """Count, mean and sum of squared deviations of two sets of rows, from each one's (exact from n1 = 0)."""
    n = n1 + n2
    delta = mean2 - mean1
    return n, mean1 + delta * (n2 / n), m2_1 + m2_2 + delta.square() * (n1 * n2 / n)


def _scale(mean: np.ndarray, var: np.ndarray, n: int) -> np.ndarray:
    """Standard deviations, 1 for constant columns: StandardScaler's rule (its variance error bound)."""
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[constant | (scale < 10 * eps)] = 1.0
    return scale


class _Basis:
    """The features the weights W are fitted on, as a linear map of X: standardized or whitened rows.

    Standardized: ``z = (x - mean) / scale``. Whitened (`factors` given), block by block of
    columns a:b: ``z[a:b] = (x[a:b] - mean[a:b]) / scale[a:b] @ U^-1 * gain`` for the block's
    Cholesky factor ``U.T @ U = cov(standardized X[:, a:b]) + floor * I``, `gain` making the
    block's whitened features' variance average 1. One block of every column: the Gram matrix,
    so an L2-penalized linear model's solution, of :class:`convae.probe.Whitener`'s PCA whitening
    (its rows are these rotated), at a Cholesky's cost instead of an eigendecomposition's; several:
    each block its own Whitener (a block-diagonal whitening), whose covariances and factors cost
    the squares and cubes of the blocks' widths instead of the whole's.
    ``weights(W)`` gives the weights on X; ``gradient(G)`` maps a gradient on X's weights back to W.

    The products with U^-1 are triangular solves with U (trsm, k right-hand sides), no inverse
    formed: inverting the factor (strtri) took 9.7 s of the mnist preset's 63 s whitened fit
    (22,400 columns), and the solves cost about 0.4 s a pass where the inverse's products took
    0.26 (benchmarks/RESULTS.md). On one thread: MKL's two-thread solves were 1.7-2.7x as fast
    but their bits differ from one thread's, and a fit's result must not depend on its threads.
    """

    # the L2 penalty is on W (the whitened model's weights); a preconditioner's basis puts it on
    # the standardized weights instead (:class:`_BlockBasis`)
    penalizes_standardized = False

    def __init__(self, mean: np.ndarray, scale: np.ndarray, factors=()):
        self.mean, self.scale = mean, scale
        # (a, b, U.T, gain) a block: U.T lower triangular and row-major, in the Fortran-ordered U's memory
        self.whitened = [(a, b, torch.from_numpy(np.ascontiguousarray(U.T)), gain) for a, b, U, gain in factors]

    def weights(self, W: np.ndarray) -> np.ndarray:
        out = W.copy()
        for a, b, lower, gain in self.whitened:  # U @ A.T = W.T: A = W @ U^-T
            out[:, a:b] = self._solve(lower.T, torch.tensor(W[:, a:b].T, dtype=torch.float32), upper=True).numpy().T
            out[:, a:b] *= gain
        return out / self.scale

    def gradient(self, G: np.ndarray) -> np.ndarray:
        out = G / self.scale
        for a, b, lower, gain in self.whitened:  # U.T @ Y = G.T: Y.T = G @ U^-1
            out[:, a:b] = self._solve(lower, torch.tensor(out[:, a:b].T, dtype=torch.float32), upper=False).numpy().T
            out[:, a:b] *= gain
        return out

    @staticmethod
    def _solve(triangle: torch.Tensor, B: torch.Tensor, *, upper: bool) -> torch.Tensor:
        with _torch_threads(1):  # a transposed view is read as such (trsm's flag): no copy
            return torch.linalg.solve_triangular(triangle, B, upper=upper)


class _BlockBasis(_Basis):
    """A preconditioner for L-BFGS: W in the coordinates of a whitening of blocks of consecutive
    columns (``A[:, a:b] = W[:, a:b] @ R_ab.T / scale[a:b]``), the penalty still on the
    standardized weights ``A * scale``. The objective and its minimum are the standardized fit's;
    only the path there changes: the whitened coordinates are far better conditioned than the
    standardized ones, whose correlated columns (neighbouring cells, a filter's sign-split halves,
    a group's channels) make plain L-BFGS creep along their long valleys for hundreds of passes.

    `factors`: (a, b, R_ab) for each block, R_ab upper triangular (float32).
    """

    penalizes_standardized = True

    def __init__(self, mean: np.ndarray, scale: np.ndarray, factors: list[tuple[int, int, np.ndarray]], n_threads: int):
        super().__init__(mean, scale)
        self.n_threads = max(1, n_threads)  # the blocks' products, shared out over one-threaded workers
        self.blocks = [(a, b) for a, b, _ in factors]
        self.factors = {(a, b): torch.from_numpy(f) for a, b, f in factors}
        costs = [(b - a) ** 2 for a, b in self.blocks]
        self._weight_shares = self._gradient_shares = self._shares(costs)

    def weights(self, W: np.ndarray) -> np.ndarray:
        W32 = torch.tensor(W, dtype=torch.float32)
        out = torch.empty_like(W32)

        def block(a: int, b: int) -> None:
            torch.mm(W32[:, a:b], self.factors[a, b].T, out=out[:, a:b])

        self._run(block, self._weight_shares)
        return out.numpy().astype(np.float64) / self.scale

    def gradient(self, G: np.ndarray) -> np.ndarray:
        G32 = torch.tensor(G / self.scale, dtype=torch.float32)
        out = torch.empty_like(G32)

        def block(a: int, b: int) -> None:
            torch.mm(G32[:, a:b], self.factors[a, b], out=out[:, a:b])

        self._run(block, self._gradient_shares)
        return out.numpy().astype(np.float64)

    def _shares(self, costs: list[int]) -> list[list[tuple[int, int]]]:
        """The blocks dealt to the threads by cost: largest first, each to the least loaded thread."""
        shares: list[list[tuple[int, int]]] = [[] for _ in range(self.n_threads)]
        loads = [0] * self.n_threads
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
            t = loads.index(min(loads))
            shares[t].append(self.blocks[i])
            loads[t] += costs[i]
        return shares

    def _run(self, block, shares: list[list[tuple[int, int]]]) -> None:
        """`block(a, b)` for every block, each thread its share."""

        def work(share: list[tuple[int, int]]) -> None:
            for a, b in share:
                block(a, b)

        if self.n_threads == 1:
            work(shares[0])
            return
        with _torch_threads(1), _one_threaded_pool(self.n_threads) as pool:
            list(pool.map(work, shares))


def _block_preconditioner(rows: _Rows, mean: np.ndarray, scale: np.ndarray) -> _BlockBasis:
    """:class:`_BlockBasis` for the standardized rows: each block's covariance from a sample of
    rows (2 a column of the widest block, evenly spaced), floored, factored and inverted in place,
    one block at a time (each block reads its columns of the sample: the blocks' covariances
    together would not be small)."""
    d = rows.d
    size = min(_PRECONDITION_BLOCK_COLUMNS, max(_PRECONDITION_MIN_COLUMNS, _PRECONDITION_BYTES // (4 * d)))
    n_blocks = -(-d // size)
    edges = [(round(i * d / n_blocks), round((i + 1) * d / n_blocks)) for i in range(n_blocks)]  # even widths
    picks = _covariance_rows(rows.n, d, 2 * max(b - a for a, b in edges))
    n = rows.n if picks is None else len(picks)
    # bf16 products where native: a preconditioner need not be exact, only positive definite,
    # which the floor sees to (a bf16 covariance's errors are ~1e-4 an entry)
    dtype = torch.bfloat16 if bf16_products(torch.device("cpu")) else torch.float32
    factors = []
    with _torch_threads(max(1, rows.n_threads)):
        for a, b in edges:
            cov = torch.zeros((b - a, b - a), dtype=torch.float32)
            for zt in _standardized_blocks(rows, mean[a:b], scale[a:b], picks, dtype, columns=(a, b)):
                cov += zt @ zt.T
            c = cov.div_(max(n - 1, 1)).numpy().T  # Fortran order (symmetric): LAPACK works in place
            _add_floor(c, _PRECONDITION_FLOOR, least=1e-12)  # a block of constant columns factors too
            upper = cholesky(c, lower=False, overwrite_a=True, check_finite=False)
            factors.append((a, b, _inverse_in_place(upper, "preconditioning")))
    return _BlockBasis(mean, scale, factors, rows.n_threads)


def _covariance_rows(n: int, d: int, whiten_rows) -> np.ndarray | None:
    """The rows the whitening's covariance is computed from: None for all `n`, else sorted indices.

    Evenly spaced, not drawn: deterministic, and a share of every part of X (rows in class order,
    or the originals followed by their mirror images).
    """
    m = max(_WHITEN_AUTO_ROWS, 2 * d) if whiten_rows == "auto" else whiten_rows
    if m is None or m >= n:
        return None
    return np.linspace(0, n - 1, m).round().astype(np.int64)  # distinct: the spacing is at least 1


def _block_widths(whiten_blocks, d: int) -> list[int] | None:
    """`whiten_blocks` checked: positive widths adding up to the `d` columns (None stays None)."""
    if whiten_blocks is None:
        return None
    widths = [int(w) for w in np.asarray(whiten_blocks).ravel()]
    if any(w < 1 for w in widths) or sum(widths) != d:
        raise ValueError(f"whiten_blocks must be positive widths adding up to the {d} columns of X, got {widths}")
    return widths


def _sampled_rows(
    rows: _Rows, picks: np.ndarray | None, start: int, stop: int, columns: tuple[int, int] | None = None
) -> torch.Tensor:
    """Rows `start` to `stop` of the covariance's sample, in X's dtype: X's own rows, or those
    picked (a copy of their `columns` alone, (a, b); None: all)."""
    a, b = columns or (0, rows.d)
    if picks is None:
        return rows.host_rows(start, stop)[:, a:b]
    return torch.from_numpy(np.ascontiguousarray(rows.X[picks[start:stop], a:b]))


def _whitened_basis(
    rows: _Rows, mean: np.ndarray, scale: np.ndarray, eps: float, picks: np.ndarray | None, widths=None
) -> _Basis:
    """The whitening of :class:`_Basis` for the standardized rows, each block of consecutive
    columns `widths` wide (None: one block of all) on its own, floor `eps` x the block's mean
    variance, from the covariance of the rows `picks` (None: all)."""
    edges = np.cumsum([0, *(widths if widths is not None else [rows.d])])
    factors = []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        # one d x d float32 matrix a block, kept: the solves read it
        factor, floor = _regularized_factor(rows, mean[a:b], scale[a:b], eps, picks, (a, b))
        lower = torch.from_numpy(np.ascontiguousarray(factor.T))
        # mean variance of the whitened axes: mean of eigenvalue / (eigenvalue + floor) = 1 - floor tr((cov + floor)^-1) / d
        variance = 1.0 - floor * _inverse_trace(lower) / (b - a)
        factors.append((a, b, factor, 1.0 / np.sqrt(max(variance, np.finfo(np.float64).tiny))))
    return _Basis(mean, scale, factors)


def _inverse_trace(lower: torch.Tensor) -> float:
    """tr((L @ L.T)^-1) = ||L^-1||^2 (Frobenius) for the lower triangular L: exactly up to
    _EXACT_TRACE_COLUMNS (from a copy's inverse), else by Hutchinson's estimator, the mean of
    ||L^-1 z||^2 over _TRACE_PROBES random +-1 vectors z (seeded), which needs no inverse.

    The estimate's relative standard deviation is at most sqrt(2 / (probes floor tr)) for a
    covariance floored at `floor` (the inverse's eigenvalues are at most 1 / floor), and the
    whitened variance it gives, 1 - floor tr / d, moves by floor tr / d times that.
    """
    if lower.shape[0] <= _EXACT_TRACE_COLUMNS:
        inverse = _inverse_in_place(np.array(lower.numpy().T, order="F"), "whitening")  # of U = L.T
        return float(np.square(inverse, dtype=np.float64).sum())
    generator, total = torch.Generator().manual_seed(0), 0.0
    for _ in range(0, _TRACE_PROBES, 64):  # 64 probes a solve: 5.7 MB at 22,400 columns
        z = torch.randint(0, 2, (lower.shape[0], 64), generator=generator).to(torch.float32).mul_(2).sub_(1)
        with _torch_threads(1):
            y = torch.linalg.solve_triangular(lower, z, upper=False)
        total += float(y.square_().sum(dtype=torch.float64))
    return total / _TRACE_PROBES


def _regularized_factor(
    rows: _Rows, mean: np.ndarray, scale: np.ndarray, eps: float, picks: np.ndarray | None, columns: tuple[int, int]
) -> tuple[np.ndarray, float]:
    """The upper Cholesky factor of ``cov + floor * I`` (in cov's memory) and the floor, `eps` x the
    standardized rows' mean variance, for X's `columns` (a, b; `mean` and `scale` are theirs).

    A bf16 covariance's entries are off by about 1e-4 (rms, the mnist preset's 22,400 columns);
    added up over many columns, errors like these can outweigh a small floor and leave the matrix
    indefinite (those features with whiten=0.01: "1405-th leading minor not positive definite",
    where whiten=0.1 factors). The covariance is then computed again in float32, where only a
    floor lost in float32's rounding still fails.
    """
    tries = (True, False) if _bf16_covariance(columns[1] - columns[0]) else (False,)
    for bf16 in tries:
        # upper triangle, float32, Fortran order
        cov = _covariance(rows, mean, scale, picks, bf16=bf16, columns=columns)
        floor = _add_floor(cov, eps)
        try:  # in place (the lower triangle zeroed by cholesky)
            return _upper_cholesky(cov, rows.n_threads), floor  # factor.T @ factor = cov
        except np.linalg.LinAlgError:
            del cov  # its memory before the next try's
            if not bf16:
                raise ValueError(
                    f"whitening failed: the features' covariance plus whiten={eps:g} x its mean variance is not "
                    "positive definite in float32; raise whiten"
                ) from None
    raise AssertionError("unreachable")


def _add_floor(cov: np.ndarray, eps: float, least: float = np.finfo(np.float64).tiny) -> float:
    """Adds `eps` x the mean of `cov`'s diagonal (at least `least`) to its diagonal, in place;
    returns that floor."""
    floor = eps * max(float(np.diagonal(cov).astype(np.float64).mean()), least)
    cov[np.diag_indices_from(cov)] += np.float32(floor)
    return floor


def _inverse_in_place(upper: np.ndarray, what: str) -> np.ndarray:
    """The inverse of an upper Cholesky factor (float32, Fortran order), in its own memory."""
    inverse, info = strtri(upper, lower=0, overwrite_c=1)
    if info != 0:
        raise ValueError(f"{what} failed: the covariance's Cholesky factor is singular (LAPACK info {info})")
    return inverse


def _bf16_covariance(d: int) -> bool:
    """Whether the whitening's covariance of `d` columns is computed from bf16 products (:func:`_covariance_bf16`)."""
    return d >= _BF16_COVARIANCE_COLUMNS and bf16_products(torch.device("cpu"))


def _upper_cholesky(cov: np.ndarray, n_threads: int) -> np.ndarray:
    """The upper Cholesky factor of `cov` (float32, Fortran order, its upper triangle read), in
    cov's own memory, by OpenBLAS below _OPENBLAS_CHOLESKY_COLUMNS and by MKL (torch) from there."""
    if cov.shape[0] < _OPENBLAS_CHOLESKY_COLUMNS:
        return cholesky(cov, lower=False, overwrite_a=True, check_finite=False)
    factor = torch.from_numpy(cov)  # column-major, as LAPACK takes it: no copy
    info = torch.empty((), dtype=torch.int32)
    with _torch_threads(max(1, n_threads)):
        torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
    if int(info) > 0:
        raise np.linalg.LinAlgError(f"{int(info)}-th leading minor not positive definite")
    return cov


def _covariance(
    rows: _Rows,
    mean: np.ndarray,
    scale: np.ndarray,
    picks: np.ndarray | None = None,
    *,
    bf16: bool | None = None,
    columns: tuple[int, int] | None = None,
) -> np.ndarray:
    """``Z.T @ Z / (n - 1)`` of the standardized rows Z (those `picks` names; None: all) of X's
    `columns` (a, b; None: all; `mean` and `scale` are theirs), upper triangle, by syrk over
    blocks of rows.

    A block is large (32 MiB in float32) because syrk runs at the matmul peak only on tall blocks;
    its half of the products is about 1.6x faster than torch's full product (measured: 6,144 columns).
    With `bf16` (None: where the CPU multiplies bf16 natively and the matrix is wide),
    :func:`_covariance_bf16` instead.
    """
    a0, b0 = columns or (0, rows.d)
    d = b0 - a0
    if _bf16_covariance(d) if bf16 is None else bf16:
        return _covariance_bf16(rows, mean, scale, picks, (a0, b0))
    n = rows.n if picks is None else len(picks)
    step = max(1, (32 << 20) // (4 * d))
    mean32, inverse_scale = mean.astype(np.float32), (1.0 / scale).astype(np.float32)
    cov = np.zeros((d, d), dtype=np.float32, order="F")
    for a in range(0, n, step):
        block = _sampled_rows(rows, picks, a, min(a + step, n), (a0, b0)).numpy().astype(np.float32)  # a copy
        block -= mean32
        block *= inverse_scale
        cov = ssyrk(1.0, block.T, beta=1.0, c=cov, overwrite_c=1)  # block.T is Fortran-ordered: no copy
    cov /= max(n - 1, 1)
    return cov


def _covariance_bf16(
    rows: _Rows,
    mean: np.ndarray,
    scale: np.ndarray,
    picks: np.ndarray | None = None,
    columns: tuple[int, int] | None = None,
) -> np.ndarray:
    """:func:`_covariance` from bf16 products: the standardized rows rounded to bf16, blocks of
    them multiplied tile by tile over one triangle (about 1,600 columns a tile), each tile's
    product summed in float32.

    No BLAS has a bf16 syrk, and torch's bf16 product returns bf16 on the CPU, so each block's
    tile product is rounded once before the float32 sum. On the AMD host without AMX (AVX512-BF16),
    at 9,600 columns: 1.45-1.5x as fast as OpenBLAS's ssyrk (benchmarks/whitening.py); the mnist
    preset's whitened fit 36.5 s -> 25-26 s, its validation accuracy 0.9936 against 0.9937
    (benchmarks/RESULTS.md).
    """
    a0, b0 = columns or (0, rows.d)
    d, n = b0 - a0, rows.n if picks is None else len(picks)
    tiles = -(-d // _BF16_TILE_COLUMNS)
    t = -(-d // tiles)
    edges = [(i, min(i + t, d)) for i in range(0, d, t)]
    # the lower triangle of a C-ordered matrix: its transpose is the upper one in Fortran order, as
    # the Cholesky factorization takes it in place (no second d x d matrix)
    cov = torch.zeros((d, d), dtype=torch.float32)
    with _torch_threads(max(1, rows.n_threads)):
        for zt in _standardized_blocks(rows, mean, scale, picks, torch.bfloat16, (a0, b0)):
            for i, (i0, i1) in enumerate(edges):
                for j0, j1 in edges[: i + 1]:
                    cov[i0:i1, j0:j1] += zt[i0:i1] @ zt[j0:j1].T
    cov /= max(n - 1, 1)
    return cov.numpy().T


def _standardized_blocks(
    rows: _Rows,
    mean: np.ndarray,
    scale: np.ndarray,
    picks: np.ndarray | None,
    dtype,
    columns: tuple[int, int] | None = None,
):
    """The standardized rows `picks` (None: all) of X's `columns` (a, b; None: all; `mean` and
    `scale` are theirs) in `dtype`, transposed (columns x rows: a range of columns is contiguous
    rows), _BF16_BLOCK_BYTES of them at a time (one buffer, reused: use each block before asking
    for the next)."""
    n = rows.n if picks is None else len(picks)
    a0, b0 = columns or (0, rows.d)
    d = b0 - a0
    step = max(1, _BF16_BLOCK_BYTES // (2 * d))
    mean32 = torch.from_numpy(mean.astype(np.float32))
    inverse_scale = torch.from_numpy((1.0 / scale).astype(np.float32))
    block = torch.empty((d, min(step, n)), dtype=dtype)
    piece = max(1, _CHUNK_BYTES // (4 * d))  # float32 rows converted at a time, in cache
    for a in range(0, n, step):
        b = min(a + step, n)
        for c in range(a, b, piece):
            part = torch.sub(_sampled_rows(rows, picks, c, min(c + piece, b), (a0, b0)).float(), mean32)  # never X
            block[:, c - a : c - a + len(part)] = part.mul_(inverse_scale).T
        yield block[:, : b - a]


def _chunk_loss(kind: str, scores: torch.Tensor, target: torch.Tensor, minus_ones: torch.Tensor):
    """The sum of a chunk's losses (a 0-d tensor) and their gradient with respect to `scores` (overwritten).

    `target`: class codes, (rows, 1) int64, for "multinomial" and the multi-class hinge; 0/1
    floats for "binomial"; -1/+1 floats for the two-class hinge. `minus_ones`: at least
    (rows, 1) of -1 on the device.
    """
    if kind == "multinomial":
        # log-sum-exp written out: torch's softmax and cross_entropy over k = 10 classes a row ran
        # 6-8x slower on the CPU (236 us against 39 for a chunk of 786 rows, one thread; it
        # vectorizes along the class dimension), a fixed cost every chunk pays every pass
        top = scores.amax(1, keepdim=True)
        grad = torch.sub(scores, top).exp_()
        total = grad.sum(1, keepdim=True)
        loss = (total.log() + top - scores.gather(1, target)).sum()  # each row's loss, then their sum
        grad.div_(total).scatter_add_(1, target, minus_ones[: len(target)])  # softmax - one-hot
        return loss, grad
    if kind == "binomial":
        loss = (F.softplus(scores) - target * scores).sum()
        return loss, torch.sigmoid(scores).sub_(target)
    if target.dtype == torch.int64:  # one-vs-rest: +1 for the class, -1 for the rest
        signs = torch.full_like(scores, -1.0).scatter_(1, target, 1.0)
    else:
        signs = target
    margin = (1.0 - signs * scores).clamp_(min=0.0)
    flat = margin.reshape(-1)  # scores may be a transposed view
    loss = torch.dot(flat, flat)
    return loss, margin.mul_(signs).mul_(-2.0)


@functools.cache
def _k_rows_first(chunk_rows: int, d: int, k: int) -> bool:
    """Whether this CPU computes a chunk's scores faster as ``(A @ x.T).T`` (the k-row side first)
    than as ``x @ A.T``, timed once per shape and process on one thread (a few milliseconds).

    Which is faster depends on the machine's BLAS kernels, by 2x either way (one thread, k = 10,
    4 MiB chunks of 9,600-32,000 columns): k rows first 1.6-2x as fast on the AMD host without
    AMX, x first 1.9-2.2x as fast on an Intel host with AMX (benchmarks/RESULTS.md). Both give the
    same scores but for float32 rounding; one process always uses the same.
    """
    x, A = torch.randn(chunk_rows, d), torch.randn(k, d)
    c = torch.zeros(k, 1)
    ways = (lambda: torch.addmm(c, A, x.T), lambda: torch.addmm(c.T, x, A.T))
    best = [float("inf")] * 2
    with _torch_threads(1):
        for _ in range(3):  # interleaved: a busy moment slows both alike
            for i, way in enumerate(ways):
                start = time.perf_counter()
                way()
                best[i] = min(best[i], time.perf_counter() - start)
    return best[0] <= best[1]


class _Objective:
    """``mean loss + ||W||^2 / (2 C n)`` of a linear model on standardized (whitened) X, and its gradient.

    Called with the parameters ``[W.ravel(), b]`` (W: k x d, in the units of `basis`) it makes
    ONE pass over X (see the module's docstring), so scipy's L-BFGS-B can use it directly;
    `passes` counts them. The objective is scikit-learn's ``C * sum(loss) + ||W||^2 / 2``
    divided by ``C n``: the same minimum, with gradients on the scale its `tol` is meant for.
    """

    def __init__(self, rows: _Rows, kind: str, target: np.ndarray, k: int, basis: _Basis, C: float):
        self.rows, self.kind, self.k, self.basis, self.C = rows, kind, k, basis, C
        dtype = torch.int64 if target.dtype.kind == "i" else torch.float32
        self.target = torch.as_tensor(target, dtype=dtype).reshape(-1, 1).to(rows.device)
        # one gradient accumulator per row group, reused by every pass
        self.sums = [torch.empty((k, rows.d), dtype=torch.float32, device=rows.device) for _ in rows.groups]
        self.minus_ones = torch.full((max(rows.chunk_rows, rows.code_rows), 1), -1.0, device=rows.device)
        self.passes = 0
        self.last_f, self.gradient_size = float("nan"), float("inf")

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        k, d, n = self.k, self.rows.d, self.rows.n
        W, b = theta[: k * d].reshape(k, d), theta[k * d :]
        A = self.basis.weights(W)  # folded standardization (whitening): scores = X @ A.T + c
        codes = self.rows.code_rows > 0
        products = self._int8_products(A, b) if codes else self._float_products(A, b)
        parts = self.rows.map(lambda g, a, z, chunks: self._group(*products, g, chunks), signed_codes=codes)
        self.passes += 1
        grad_A = sum(p[0].double() for p in parts).cpu().numpy()  # in group order: deterministic
        grad_c = sum(p[1] for p in parts).cpu().numpy()
        loss = float(sum(p[2] for p in parts))
        grad_A = (grad_A - np.outer(grad_c, self.basis.mean)) / n
        if self.basis.penalizes_standardized:  # a preconditioner's coordinates: the standardized fit's penalty
            standardized = A * self.basis.scale
            grad_A += standardized * self.basis.scale / (self.C * n)
            grad_W, penalty = self.basis.gradient(grad_A), float(np.sum(standardized * standardized))
            # the gradient on the standardized weights, whose size scikit-learn's tol judges
            self.gradient_size = max(float(np.abs(grad_A / self.basis.scale).max()), float(np.abs(grad_c).max()) / n)
        else:
            grad_W, penalty = self.basis.gradient(grad_A) + W / (self.C * n), float(np.sum(W * W))
        f = loss / n + penalty / (2.0 * self.C * n)
        self.last_f = f
        return f, np.concatenate([grad_W.ravel(), grad_c / n])

    def _float_products(self, A: np.ndarray, b: np.ndarray):
        """A chunk's scores, and the gradient's update, in float32 (x: a float32 chunk)."""
        device = self.rows.device
        A32 = torch.from_numpy(A.astype(np.float32)).to(device)
        c32 = torch.from_numpy((b - A @ self.basis.mean).astype(np.float32)).to(device).view(-1, 1)
        first = self.rows.k_rows_first
        return (
            lambda x: torch.addmm(c32, A32, x.T).T if first else torch.addmm(c32.T, x, A32.T),
            lambda acc, grad, x: acc.addmm_(grad.T, x),
        )

    def _int8_products(self, A: np.ndarray, b: np.ndarray):
        """The same on int8 chunks of codes - 128 (:mod:`.int8`), for the weights its digits hold."""
        weights = int8.Weights(torch.from_numpy(A), torch.from_numpy(b - A @ self.basis.mean))
        return weights.scores, functools.partial(int8.add_gradient, buffer=self.rows.buffer)

    def _group(self, scores_of, add_gradient, g: int, chunks):
        """One row group's loss, and its sums of ``grad.T @ x`` and of ``grad``, chunk after chunk."""
        acc = self.sums[g]
        acc.zero_()
        grad_c = torch.zeros(self.k, dtype=torch.float64, device=acc.device)
        loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        for a, b, x in chunks:
            chunk_loss, grad = _chunk_loss(self.kind, scores_of(x), self.target[a:b], self.minus_ones)
            loss += chunk_loss
            grad_c += grad.sum(0)
            add_gradient(acc, grad, x)  # while x is still in cache
        return acc, grad_c, loss


def _stop_at_tol(objective: _Objective, tol: float, intermediate_result) -> None:
    """L-BFGS-B's callback after each step: stop once the standardized gradient at the step's
    point (the objective's last evaluation) is within `tol`."""
    if intermediate_result.fun == objective.last_f and objective.gradient_size <= tol:
        raise StopIteration


class _StreamingLinearClassifier(ClassifierMixin, BaseEstimator):
    """What both classifiers share: the checks, the fit by fused passes, the chunked scoring."""

    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "standardize": ["boolean"],
        "whiten": [Interval(Real, 0, None, closed="neither"), None],
        "whiten_rows": [StrOptions({"auto"}), Interval(Integral, 2, None, closed="left"), None],
        "whiten_blocks": ["array-like", None],
        "precondition": ["boolean"],
        "chunk_rows": [Interval(Integral, 1, None, closed="left"), None],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
        "device": [StrOptions({"cpu", "cuda", "auto"})],
    }
    _ftol: float  # scipy L-BFGS-B options of the estimator this one reproduces
    _maxls: int

    def _kind(self, n_classes: int) -> str:
        raise NotImplementedError

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Fit the model to `X` (rows of features, any accepted dtype, memmaps read in place) and labels `y`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features: float32, float16, float64 or uint8 (others are converted to float32),
            possibly a read-only ``np.memmap``; never copied whole.
        y : array-like of shape (n_samples,)
            Class labels (any type ``np.unique`` can sort, strings too).

        Returns
        -------
        self : object
            The fitted classifier.
        """
        # finiteness is checked in the statistics pass: scikit-learn's check sums float16 in
        # float16, overflows on large matrices and then allocates a boolean copy of X
        X, y = validate_data(self, X, y, dtype=_DTYPES, ensure_all_finite=False)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; got 1 class ({self.classes_[0]!r})"
            )
        device = _resolve_device(self.device)
        # handing a pass to worker threads costs scheduler wake-ups, milliseconds on a busy
        # machine: by default only passes over enough bytes to pay for them are shared out
        n_threads = self.n_threads or (torch.get_num_threads() if X.nbytes >= _THREADS_FROM_BYTES else 1)
        kind = self._kind(len(self.classes_))
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        n_groups = max(n_threads, min(_MAX_GROUPS, _GROUP_BYTES // (4 * k * X.shape[1] + 1)))
        # workers run one-threaded torch ops (see the module's docstring)
        with _torch_threads(1 if device.type == "cpu" else torch.get_num_threads()):
            rows = _Rows(X, device, self.chunk_rows, n_threads, n_groups, k)
            try:
                basis, result, passes = self._solve(rows, kind, k, codes)
            finally:
                rows.close()
        self._set_solution(basis, k, X.shape[1], C=float(self.C), n=X.shape[0], result=result)
        self.n_passes_ = passes
        return self

    def _solve(self, rows: _Rows, kind: str, k: int, codes: np.ndarray):
        mean, var = _column_stats(rows)
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise ValueError("Input X contains NaN or infinity (or values too large for float32)")
        self.scale_ = _scale(mean, var, rows.n) if self.standardize else np.ones(rows.d)
        self.mean_ = mean if (self.standardize or self.whiten is not None) else np.zeros(rows.d)
        if self.whiten is not None:
            picks = _covariance_rows(rows.n, rows.d, self.whiten_rows)
            widths = _block_widths(self.whiten_blocks, rows.d)
            basis = _whitened_basis(rows, self.mean_, self.scale_, float(self.whiten), picks, widths)
        elif self.precondition and rows.d > 1 and rows.n >= 2 * _PRECONDITION_MIN_COLUMNS:
            basis = _block_preconditioner(rows, self.mean_, self.scale_)
        else:
            basis = _Basis(self.mean_, self.scale_)
        target = codes if (k > 1 or kind == "multinomial") else self._binary_target(codes)
        objective = _Objective(rows, kind, target, k, basis, float(self.C))
        # in a preconditioner's coordinates L-BFGS's gradient is not the one scikit-learn's tol
        # judges: the objective measures that one, and the callback stops where it is small enough
        preconditioned = basis.penalizes_standardized
        callback = functools.partial(_stop_at_tol, objective, self.tol) if preconditioned else None
        # L-BFGS-B's own vector operations are small BLAS calls: BLAS threads only make them wait
        # for each other (8 ms a step for 20,000 parameters on a busy 2-core machine, 0.1 ms without)
        with threadpool_limits(limits=1, user_api="blas"):
            result = minimize(
                objective,
                np.zeros(k * rows.d + k),
                jac=True,
                method="L-BFGS-B",
                callback=callback,
                options=dict(
                    maxiter=self.max_iter, maxls=self._maxls, gtol=0.0 if preconditioned else self.tol, ftol=self._ftol
                ),
            )
        passes = objective.passes + (1 if self.whiten is None else 2)  # + the statistics (and covariance) pass
        return basis, result, passes

    def _binary_target(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.float32)

    def _n_iter(self, nit: int):
        return nit

    def _set_solution(self, basis: _Basis, k: int, d: int, *, C: float, n: int, result) -> None:
        W, b = result.x[: k * d].reshape(k, d), result.x[k * d :]
        self.coef_ = basis.weights(W)  # on X as given: the standardization (whitening) folded in
        self.intercept_ = b - self.coef_ @ self.mean_
        # scikit-learn's objective, C * sum(loss) + ||W||^2 / 2, at the solution
        self.objective_ = float(result.fun) * C * n
        self.n_iter_ = self._n_iter(int(result.nit))
        if result.nit >= self.max_iter:
            warnings.warn(
                f"{type(self).__name__} stopped at max_iter={self.max_iter} before converging (tol={self.tol}); "
                "raise max_iter for the exact optimum",
                ConvergenceWarning,
                stacklevel=3,
            )

    def decision_function(self, X) -> np.ndarray:
        """Scores ``X @ coef_.T + intercept_``, computed in float64 a few MB of rows at a time.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as for :meth:`fit` (a memmap is read in place).

        Returns
        -------
        scores : ndarray of shape (n_samples,) for two classes, else (n_samples, n_classes)
            For two classes, positive scores mean ``classes_[1]``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=_DTYPES, ensure_all_finite=False, reset=False)
        coef, k = self.coef_.T, self.coef_.shape[0]
        step = max(1, _PREDICT_BYTES // (8 * max(X.shape[1], 1)))
        scores = np.empty((X.shape[0], k))
        for start in range(0, X.shape[0], step):
            np.matmul(np.asarray(X[start : start + step], dtype=np.float64), coef, out=scores[start : start + step])
        scores += self.intercept_
        if not np.isfinite(scores).all():  # a NaN or infinite feature gives a NaN or infinite score
            raise ValueError("Input X contains NaN or infinity")
        return scores[:, 0] if k == 1 else scores

    def predict(self, X) -> np.ndarray:
        """Predicted class labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as for :meth:`fit`.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            Elements of ``classes_``.
        """
        scores = self.decision_function(X)
        picked = (scores > 0).astype(np.intp) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[picked]


class StreamingLogisticRegression(_StreamingLinearClassifier):
    """Multinomial L2 logistic regression on standardized features, fitted in bounded memory.

    Minimizes scikit-learn's objective for ``make_pipeline(StandardScaler(),
    LogisticRegression(C=C))`` (lbfgs): ``C * sum_i CE(softmax(z_i W.T + b), y_i) + ||W||_F^2 / 2``
    on the standardized rows z_i (column means and population standard deviations; constant
    columns scaled by 1), intercept unpenalized; with two classes the binomial loss of one
    weight vector, as scikit-learn. The standardization is folded into the weights and every
    L-BFGS evaluation is one fused pass over X's rows (see the module's docstring), so X is
    never copied whole: a float16 memmap of the features is read in place.

    Parameters
    ----------
    C : float, default=1.0
        Inverse of the L2 penalty's strength, as in scikit-learn.
    max_iter : int, default=100
        L-BFGS iterations at most (a ConvergenceWarning when reached).
    tol : float, default=1e-4
        L-BFGS stops when every gradient entry of the objective divided by ``C * n_samples``
        is below `tol` (scikit-learn's criterion).
    standardize : bool, default=True
        Fit on standardized features (as after a StandardScaler); False fits on X as it is.
    whiten : float or None, default=None
        Fit on the (standardized) features PCA-whitened as by :class:`convae.probe.Whitener`
        with ``eps=whiten`` (the eigenvalue floor, a fraction of the mean eigenvalue), without
        a whitened copy: the whitening is folded into the weights, at the cost of one more pass
        over X and a d x d Cholesky factorization (one d x d float32 matrix while fitting). None: no whitening.
    whiten_rows : "auto", int or None, default=None
        With `whiten`, the covariance is computed from this many rows of X, evenly spaced (the
        column means and deviations still from every row); "auto" takes 20,000, or 2 per column
        if that is more; None, every row. Faster, and not free: on the mnist preset's 9,600
        columns (50,000 rows) "auto" fitted in 15-17 s instead of 24-27 s, and scored 0.9932
        on validation against 0.9941 with every row (benchmarks/RESULTS.md).
    whiten_blocks : array-like of int or None, default=None
        With `whiten`, the widths of consecutive blocks of columns, each whitened on its own (as
        by its own Whitener: a block-diagonal whitening; e.g. the widths of the layers a feature
        set joins); None, all columns together. Cheaper by the squares (covariance, memory) and
        cubes (factorization) of the widths: the mnist preset's 22,400 columns as three layers'
        blocks of 3,200, 6,400 and 12,800 (benchmarks/RESULTS.md).
    precondition : bool, default=False
        L-BFGS steps in the coordinates of a whitening of blocks of consecutive columns (each
        block's covariance from a sample of rows; 256 to 4,096 columns a block, 128 MB for them
        all): the same objective and minimum, reached in several times fewer passes where
        correlated columns make plain L-BFGS slow (wide features stopped at `max_iter` short of
        the minimum); `tol` still judges the gradient on the standardized weights. Ignored with
        `whiten`, and below 512 rows. Not always faster: on small, nearly separable problems
        (MNIST's pixels, 3,000 rows) it took more passes than plain L-BFGS.
    chunk_rows : int or None, default=None
        Rows per chunk; None sizes a float32 chunk to 4 MiB (16 MiB where the scores are computed
        rows first, 128 MiB on a GPU), at least 16 rows. For uint8 X on the CPU (int8 products),
        None means 24 MiB of codes (any number is capped at int8.MAX_CHUNK_ROWS, their sums' int32 range).
    n_threads : int or None, default=None
        Worker threads on the CPU, each running one-threaded torch operations; None uses
        ``torch.get_num_threads()`` for X of 32 MiB or more, one thread below. torch's own
        thread count is set to 1 during the fit (it is the process's: fit one model at a time).
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where the passes run; "auto" picks CUDA when torch sees a GPU.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels.
    coef_ : ndarray of shape (1, n_features) for two classes, else (n_classes, n_features)
        Weights on X as given (the standardization folded in); ``coef_ * scale_`` are the
        weights on the standardized features.
    intercept_ : ndarray of shape (1,) or (n_classes,)
        Intercepts on X as given.
    mean_, scale_ : ndarray of shape (n_features,)
        The columns' means and standard deviations used to standardize (0 and 1 without;
        with `whiten`, the means even when `standardize` is False).
    n_iter_ : ndarray of shape (1,)
        L-BFGS iterations, as scikit-learn's ``LogisticRegression.n_iter_``.
    n_passes_ : int
        Full passes over X during the fit (the statistics pass, the covariance pass with
        `whiten`, and one per evaluation; `precondition` reads a sample of rows besides).
    objective_ : float
        ``C * sum(loss) + ||W||^2 / 2`` at the solution (W in standardized, or whitened, units).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from convae.probe.linear import StreamingLogisticRegression
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = StreamingLogisticRegression(C=0.1, max_iter=500).fit(X[:1500], y[:1500])
    >>> round(clf.score(X[1500:], y[1500:]), 2)
    0.91
    """

    _ftol = 64 * np.finfo(float).eps
    _maxls = 50

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-4,
        standardize: bool = True,
        whiten: float | None = None,
        whiten_rows: int | str | None = None,
        whiten_blocks=None,
        precondition: bool = False,
        chunk_rows: int | None = None,
        n_threads: int | None = None,
        device: str = "cpu",
    ):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.whiten = whiten
        self.whiten_rows = whiten_rows
        self.whiten_blocks = whiten_blocks
        self.precondition = precondition
        self.chunk_rows = chunk_rows
        self.n_threads = n_threads
        self.device = device

    def _kind(self, n_classes: int) -> str:
        return "binomial" if n_classes == 2 else "multinomial"

    def _n_iter(self, nit: int):
        return np.array([nit], dtype=np.int32)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities: the softmax of the scores (the logistic function for two classes).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as for :meth:`fit`.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], axis=1)  # softmax([0, s]) = [1 - p, p]
        scores -= scores.max(axis=1, keepdims=True)
        proba = np.exp(scores)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict_log_proba(self, X) -> np.ndarray:
        """Logarithms of :meth:`predict_proba`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features, as for :meth:`fit`.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        return np.log(self.predict_proba(X))


class StreamingLinearSVM(_StreamingLinearClassifier):
    """One-vs-rest linear SVM with the squared hinge loss, fitted as :class:`StreamingLogisticRegression`.

    Minimizes, for each class k (one weight vector for two classes, as convae's
    :class:`convae.probe.LinearSVM`), ``||w_k||^2 / 2 + C * sum_i max(0, 1 - t_ik (z_i . w_k + b_k))^2``
    with t_ik = +1 for the class and -1 for the rest, on the standardized rows z_i, intercept
    unpenalized: LinearSVM's objective on ``StandardScaler`` output, by the same fused passes.

    Parameters
    ----------
    C : float, default=1.0
        Inverse of the L2 penalty's strength.
    max_iter : int, default=1000
        L-BFGS iterations at most (a ConvergenceWarning when reached).
    tol : float, default=1e-5
        L-BFGS's gradient tolerance on the objective divided by ``C * n_samples``, as LinearSVM.
    standardize : bool, default=True
        Fit on standardized features; False fits on X as it is.
    whiten : float or None, default=None
        Fit on the features whitened, as :class:`StreamingLogisticRegression`'s `whiten`.
    whiten_rows : "auto", int or None, default=None
        The rows the whitening's covariance is computed from, as :class:`StreamingLogisticRegression`'s.
    whiten_blocks : array-like of int or None, default=None
        Blocks of columns whitened each on its own, as :class:`StreamingLogisticRegression`'s.
    precondition : bool, default=False
        L-BFGS in a block whitening's coordinates, as :class:`StreamingLogisticRegression`'s.
    chunk_rows : int or None, default=None
        Rows per chunk; None sizes a float32 chunk to 4 MiB (16 MiB where the scores are computed
        rows first, 128 MiB on a GPU), at least 16 rows. For uint8 X on the CPU (int8 products),
        None means 24 MiB of codes (any number is capped at int8.MAX_CHUNK_ROWS, their sums' int32 range).
    n_threads : int or None, default=None
        Worker threads on the CPU, as :class:`StreamingLogisticRegression`'s.
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where the passes run; "auto" picks CUDA when torch sees a GPU.

    Attributes
    ----------
    classes_, coef_, intercept_, mean_, scale_, n_passes_, objective_
        As for :class:`StreamingLogisticRegression`.
    n_iter_ : int
        L-BFGS iterations.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from convae.probe.linear import StreamingLinearSVM
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = StreamingLinearSVM(C=0.01).fit(X[:1500], y[:1500])
    >>> round(clf.score(X[1500:], y[1500:]), 2)
    0.89
    """

    _ftol = 1e-12
    _maxls = 20

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 1000,
        tol: float = 1e-5,
        standardize: bool = True,
        whiten: float | None = None,
        whiten_rows: int | str | None = None,
        whiten_blocks=None,
        precondition: bool = False,
        chunk_rows: int | None = None,
        n_threads: int | None = None,
        device: str = "cpu",
    ):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.whiten = whiten
        self.whiten_rows = whiten_rows
        self.whiten_blocks = whiten_blocks
        self.precondition = precondition
        self.chunk_rows = chunk_rows
        self.n_threads = n_threads
        self.device = device

    def _kind(self, n_classes: int) -> str:
        return "squared_hinge"

    def _binary_target(self, codes: np.ndarray) -> np.ndarray:
        return np.where(codes == 1, 1.0, -1.0).astype(np.float32)
