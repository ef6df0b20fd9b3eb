"""Linear-probe benchmark: the streaming logistic regression's pass against the memory bandwidth, and its fit against scikit-learn's.

    .venv/bin/python benchmarks/linear_probe.py [--rows 100000 --dims 12800 --dtype float16|float32|uint8]
        [--passes 5] [--fit-max-iter 20] [--compare-rows 10000 --compare-dims 2048] [--quick]
    .venv/bin/python benchmarks/linear_probe.py --basis 22400 [--classes 10]

Measures on this machine, in one run, and prints Markdown tables:
- the memory bandwidth: a numpy copy of a 1 GiB array (best of 3), reported as bytes copied per
  second (each byte is read once and written once);
- one fused pass (objective and gradient of `convae.probe.linear.StreamingLogisticRegression`) over
  a synthetic feature matrix (`--rows` x `--dims`, `--dtype`, class-dependent ReLU features)
  memmapped read-only from a temporary .npy, for each of `--threads` (a list) and
  `--threads-mode`: "workers" (the module's way: worker threads each running one-threaded
  torch operations) and "intra-op" (one worker, torch's own threads). The time of every pass
  is set beside a copy of the same number of bytes timed right before it (the machine is
  shared: only ratios measured side by side mean anything); the ratio is the pass time over
  that copy's (best pair and median), GFLOP/s counts the two products (4 x rows x dims x
  classes). uint8 (the probe's 8-bit codes: the features x 32, rounded, clipped at 255) is timed
  on both of its paths: the int8 products the module uses ("int8") and float32 chunks converted
  from the codes ("float32", the path before them, still the GPU's). With `--compute-only`, the
  same pass over one row repeated (row stride 0): the arithmetic alone, nothing to read from
  memory, which says whether a pass is bound by the memory or by the cores;
- a fit at that size, capped at `--fit-max-iter` L-BFGS iterations, in a fresh process: time,
  iterations, passes (evaluations of the objective, + 1 for the column statistics), peak RSS
  (VmHWM) and the part of it that is the memmap's pages (file-backed: page cache, not a copy);
- at `--compare-rows` x `--compare-dims` float32: scikit-learn's
  ``make_pipeline(StandardScaler(), LogisticRegression(C=64/dim))`` against the streaming
  classifier on the same array in memory and on a float16 memmap of it, each in a fresh
  process: fit time, iterations, time per iteration, peak RSS, held-out accuracy, and the
  objective ``C * sum(cross-entropy) + ||W||^2 / 2`` reached (W on standardized features).

`--basis DIMS` times, instead, what a whitened fit adds to each pass: the weights and the
gradient multiplied by the inverse of the Cholesky factor U (DIMS x DIMS, upper triangular), as
products with the inverse (numpy's full product on one BLAS thread and on all; blocks of its
triangle shared out to threads, the probe's way until 2026-12-07) and as the module's triangular
solves with U (no inverse), side by side, best of 5 each, and the inverse's own time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GIB = 1 << 30


def copy_seconds(src: np.ndarray, dst: np.ndarray) -> float:
    t = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t


def bandwidth(nbytes: int = GIB, repeat: int = 3) -> float:
    """Bytes copied per second by numpy (best of `repeat`), each byte read once and written once."""
    src = np.ones(nbytes // 8)
    dst = np.zeros_like(src)  # touched: no page faults inside the timing
    return nbytes / min(copy_seconds(src, dst) for _ in range(repeat))


def write_features(path: Path, rows: int, dims: int, classes: int, dtype: str, seed: int = 0) -> np.ndarray:
    """ReLU features with a weak class signal written to a .npy chunk by chunk; returns the labels.

    ``relu(center[label] + 16 shared factors + noise)``: like pooled activations, non-negative,
    correlated (the shared factors make L-BFGS work for it) and not separable (a linear probe
    gets about 75% with 10 classes), so a fit takes as many iterations as on real features.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dims), dtype=np.float32) * np.float32(4 / np.sqrt(dims))
    mixing = rng.standard_normal((16, dims), dtype=np.float32) * np.float32(0.5)
    labels = rng.integers(0, classes, rows)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, dims))
    step = max(1, (64 << 20) // (4 * dims))
    for start in range(0, rows, step):
        m = min(step, rows - start)
        x = rng.standard_normal((m, dims), dtype=np.float32)
        x += centers[labels[start : start + m]]
        x += rng.standard_normal((m, 16), dtype=np.float32) @ mixing
        x = np.maximum(x, 0.0)
        out[start : start + m] = np.minimum(np.rint(x * 32), 255) if dtype == "uint8" else x
    out.flush()
    del out
    return labels


class PeakMemory:
    """Peak RSS of this process, and of its anonymous and file-backed parts (sampled every 10 ms)."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict:
        # VmHWM, not getrusage's ru_maxrss: a process started by posix_spawn/vfork inherits its
        # parent's peak in ru_maxrss (kept across exec), VmHWM belongs to its own address space
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return {"peak_rss": hwm, "peak_anon": self.peak["RssAnon"], "peak_file": self.peak["RssFile"]}


def time_passes(
    X: np.ndarray,
    labels: np.ndarray,
    mode: str,
    threads: int,
    passes: int,
    chunk_rows: int | None,
    source: str,
    products: str = "",
) -> dict:
    """Fused passes over X at a fixed point, each beside a numpy copy of X's bytes.

    `products`: for uint8 X, "int8" (the module's) or "float32" (the codes converted).
    """
    import torch

    from convae.probe import linear as _linear

    k, d = int(labels.max()) + 1, X.shape[1]
    theta = np.random.default_rng(1).standard_normal(k * d + k) * 1e-3
    workers, torch_threads = (threads, 1) if mode == "workers" else (1, threads)
    src = np.ones(X.nbytes // 8)
    dst = np.zeros_like(src)
    pairs = []
    with _linear._torch_threads(torch_threads):
        rows = _linear._Rows(X, torch.device("cpu"), chunk_rows, workers, max(workers, _linear._MAX_GROUPS), k)
        if products == "float32":
            rows.code_rows = 0  # the float32 chunks every other dtype reads
        basis = _linear._Basis(np.zeros(d), np.ones(d))
        objective = _linear._Objective(rows, "multinomial", labels, k, basis, 1.0)
        objective(theta)  # warm-up: the file into the page cache, buffers allocated
        for _ in range(passes):
            copy = copy_seconds(src, dst)
            t = time.perf_counter()
            objective(theta)
            pairs.append((time.perf_counter() - t, copy))
        chunk = rows.code_rows or rows.chunk_rows
        rows.close()
    ratios = sorted(p / c for p, c in pairs)
    best = min(pairs, key=lambda pc: pc[0] / pc[1])
    return {
        "mode": f"{mode} {products}".strip(),
        "threads": threads,
        "source": source,
        "chunk_rows": chunk,
        "pass_s": best[0],
        "copy_s": best[1],
        "bytes": X.nbytes,
        "ratio_best": ratios[0],
        "ratio_median": float(np.median(ratios)),
        "flops": 4 * X.shape[0] * d * k,
    }


def repeated_chunk(X: np.ndarray, chunk_rows: int | None) -> np.ndarray:
    """X's shape, every row X's first row (row stride 0): the same pass with nothing to read from memory."""
    return np.lib.stride_tricks.as_strided(X[:1], shape=X.shape, strides=(0, X.strides[1]), writeable=False)


def child(spec: dict) -> dict:
    """One fit in this (fresh) process: its time, iterations, passes, peak memory, accuracy, objective."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from convae.probe.linear import StreamingLogisticRegression

    warnings.simplefilter("ignore", ConvergenceWarning)
    with PeakMemory() as memory:
        X = np.load(spec["X"], mmap_mode="r" if spec["mmap"] else None)
        y = np.load(spec["y"])
        n_fit = spec.get("n_fit", len(y))
        C = 64.0 / X.shape[1]
        t = time.perf_counter()
        if spec["kind"] == "sklearn":
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=spec["max_iter"]))
            model.fit(X[:n_fit], y[:n_fit])
            n_iter, passes = int(model[-1].n_iter_[0]), None
        else:
            model = StreamingLogisticRegression(C=C, max_iter=spec["max_iter"], chunk_rows=spec.get("chunk_rows"))
            model.fit(X[:n_fit], y[:n_fit])
            n_iter, passes = int(model.n_iter_[0]), model.n_passes_
        fit_s = time.perf_counter() - t
        accuracy = float(model.score(X[n_fit:], y[n_fit:])) if n_fit < len(y) else None
    return {
        **spec,
        "fit_s": fit_s,
        "n_iter": n_iter,
        "passes": passes,
        "accuracy": accuracy,
        **memory.report(),
        "objective": objective(model, X[:n_fit], y[:n_fit], C) if spec.get("objective", True) else None,
    }


def objective(model, X: np.ndarray, y: np.ndarray, C: float) -> float:
    """``C * sum(cross-entropy) + ||W||^2 / 2`` with W on standardized features, for either model."""
    weights = model[-1].coef_ if hasattr(model, "steps") else model.coef_ * model.scale_
    step = max(1, (64 << 20) // (8 * X.shape[1]))
    loss = 0.0
    for start in range(0, len(y), step):
        log_proba = model.predict_log_proba(X[start : start + step])
        codes = np.searchsorted(model.classes_, y[start : start + step])
        loss -= float(log_proba[np.arange(len(codes)), codes].sum())
    return C * loss + 0.5 * float(np.sum(weights**2))


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f}"


def basis_products(dims: int, classes: int, repeat: int = 5) -> str:
    """A Markdown table: the whitened basis' two products a pass (W @ U^-T, G @ U^-1) for an upper
    triangular U, timed in turn (best of `repeat`) with the largest difference from the first way:
    numpy's full products with the inverse on one BLAS thread (what L-BFGS's loop allows, the probe
    before 2026-12-07) and on all; the inverse's triangle in blocks of 256 columns shared out to
    torch's threads (the probe until 2026-12-07, evening); convae's triangular solves with U (no
    inverse). And the inverse itself (strtri, once), which the solves make unnecessary."""
    import torch
    from scipy.linalg.lapack import strtri
    from threadpoolctl import threadpool_limits

    from convae.probe import linear as _linear

    rng = np.random.default_rng(0)
    U = np.zeros((dims, dims), dtype=np.float32, order="F")
    # diagonally dominant (a random triangular matrix's inverse grows exponentially with its size),
    # filled a block of columns at a time: bounded temporaries
    for j in range(0, dims, 2048):
        block = np.triu(rng.standard_normal((dims, min(2048, dims - j)), dtype=np.float32), k=-j) * (0.5 / dims)
        block[np.arange(j, min(j + 2048, dims)), np.arange(block.shape[1])] = 1.0
        U[:, j : j + 2048] = block
    W = rng.standard_normal((classes, dims))
    threads = torch.get_num_threads()
    basis = _linear._Basis(np.zeros(dims), np.ones(dims), [(0, dims, U, 1.0)])
    start = time.perf_counter()
    R, info = strtri(U.copy(order="F"), lower=0, overwrite_c=1)  # U^-1
    inverse_s = time.perf_counter() - start
    lower_R = torch.from_numpy(np.ascontiguousarray(R.T))  # R.T, row-major: as the blocks read it

    def full(blas_threads):
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            return W.astype(np.float32) @ R.T, W.astype(np.float32) @ R

    ways = {
        "inverse: full product (numpy), 1 BLAS thread": lambda: full(1),
        f"inverse: full product (numpy), {threads} BLAS threads": lambda: full(threads),
        f"inverse: blocks of its triangle on {threads} threads": lambda: _inverse_blocks(lower_R, W, threads),
        "triangular solves with U, 1 thread (convae's)": lambda: (basis.weights(W), basis.gradient(W)),
    }
    best = dict.fromkeys(ways, float("inf"))
    outs = {name: f() for name, f in ways.items()}  # warm-up, and the results compared
    for _ in range(repeat):
        for name, f in ways.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    reference = next(iter(outs.values()))
    diff = max(  # both products of every way
        float(np.abs(a - b).max() / np.abs(a).max()) for out in outs.values() for a, b in zip(reference, out)
    )
    first = next(iter(best.values()))
    lines = [f"Whitened basis, {dims:,} columns, {classes} classes (max relative difference {diff:.1e}); "
             f"the inverse (strtri, once): {inverse_s:.1f} s\n",
             "| products a pass | ms | vs the first |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {s * 1e3:.0f} | {s / first:.2f}x |" for name, s in best.items()]
    return "\n".join(lines)


def _inverse_blocks(lower_R, W: np.ndarray, threads: int, step: int = 256):
    """W @ R.T and W @ R by blocks of 256 columns over R's triangle (R.T given row-major), the
    blocks shared out to `threads` one-threaded workers: how the probe multiplied by the inverse."""
    import torch

    d = lower_R.shape[0]
    W32 = torch.tensor(W, dtype=torch.float32)
    weights, gradient = torch.empty_like(W32), torch.empty_like(W32)

    def block(a: int) -> None:
        b = min(a + step, d)
        torch.mm(W32[:, a:], lower_R[a:, a:b], out=weights[:, a:b])  # R.T zero above its diagonal
        torch.mm(W32[:, :b], lower_R[a:b, :b].T, out=gradient[:, a:b])  # R zero below its diagonal

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(block, range(0, d, step)))
    finally:
        torch.set_num_threads(before)
    return weights.numpy(), gradient.numpy()


def pass_table(bw: float, results: list[dict]) -> str:
    lines = [
        "| rows read from | threads | chunk rows | GB read / pass | copy of those bytes beside it (s) "
        "| bound at the 1 GiB copy rate (s) | pass (s) | ratio: pass / copy, best | median | GB/s | GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['source']} | {r['threads']} {r['mode']} | {r['chunk_rows']} | {gb(r['bytes'])} | {r['copy_s']:.3f} "
            f"| {r['bytes'] / bw:.3f} | {r['pass_s']:.3f} | {r['ratio_best']:.2f} | {r['ratio_median']:.2f} "
            f"| {r['bytes'] / r['pass_s'] / 1e9:.2f} | {r['flops'] / r['pass_s'] / 1e9:.0f} |"
        )
    return "\n".join(lines)


def fit_table(results: list[dict]) -> str:
    lines = [
        "| fit | rows x dims | input | fit (s) | iterations | passes | s / iteration | peak RSS (GB) "
        "| anon (GB) | memmap pages (GB) | held-out accuracy | objective |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lines.append(
            f"| {r['label']} | {r['shape']} | {r['input']} | {r['fit_s']:.1f} | {r['n_iter']} | {r['passes'] or '-'} "
            f"| {r['fit_s'] / max(r['n_iter'], 1):.3f} | {gb(r['peak_rss'])} | {gb(r['peak_anon'])} "
            f"| {gb(r['peak_file'])} | {acc} | {'-' if r['objective'] is None else format(r['objective'], '.6g')} |"
        )
    return "\n".join(lines)


def compare_fits(tmp: Path, args) -> list[dict]:
    """scikit-learn's pipeline and the streaming fit on one float32 array (and its float16 memmap)."""
    rows, dims, held_out = args.compare_rows, args.compare_dims, args.compare_rows // 5
    labels = write_features(tmp / "cmp32.npy", rows + held_out, dims, args.classes, "float32", seed=2)
    np.save(tmp / "cmp16.npy", np.load(tmp / "cmp32.npy").astype(np.float16))
    np.save(tmp / "cmp_y.npy", labels)
    shape = f"{rows:,} x {dims:,}"
    common = {"y": str(tmp / "cmp_y.npy"), "n_fit": rows, "max_iter": args.compare_max_iter, "shape": shape}
    specs = [
        {
            "label": "scikit-learn pipeline",
            "kind": "sklearn",
            "X": str(tmp / "cmp32.npy"),
            "mmap": False,
            "input": "float32 in memory",
        },
        {
            "label": "streaming",
            "kind": "streaming",
            "X": str(tmp / "cmp32.npy"),
            "mmap": False,
            "input": "float32 in memory",
        },
        {
            "label": "streaming",
            "kind": "streaming",
            "X": str(tmp / "cmp16.npy"),
            "mmap": True,
            "input": "float16 memmap",
        },
    ]
    if args.skip_sklearn:
        specs = specs[1:]
    return [run_child({**common, **s}) for s in specs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dims", type=int, default=12_800)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "uint8"])
    p.add_argument("--passes", type=int, default=5, help="timed passes per threads mode")
    p.add_argument("--threads", default=None, help="comma-separated thread counts; default: torch.get_num_threads()")
    p.add_argument(
        "--compute-only",
        action="store_true",
        help="also time the pass over one row repeated: the compute with no memory traffic",
    )
    p.add_argument("--threads-mode", default="workers,intra-op")
    p.add_argument("--chunk-rows", default="auto", help="comma-separated; auto: the module's default")
    p.add_argument("--fit-max-iter", type=int, default=20, help="0: no fit at the full size")
    p.add_argument("--compare-rows", type=int, default=10_000)
    p.add_argument("--compare-dims", type=int, default=2048)
    p.add_argument("--compare-max-iter", type=int, default=100)
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--quick", action="store_true", help="a small run: 20,000 x 2,048, 3 passes, 10 iterations")
    p.add_argument("--tmp", default=None, help="folder for the temporary .npy files (default: the system's)")
    p.add_argument("--basis", type=int, default=0, help="DIMS: time the whitened basis' products alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.basis:
        print(basis_products(args.basis, args.classes))
        return
    if args.quick:
        args.rows, args.dims, args.passes, args.fit_max_iter = 20_000, 2048, 3, 10
        args.compare_rows, args.compare_dims, args.compare_max_iter = 5000, 512, 50
    import torch

    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    chunks = [None if c == "auto" else int(c) for c in args.chunk_rows.split(",")]
    print(
        f"# Linear probe benchmark\n\n{os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads; "
        f"load average {os.getloadavg()[0]:.1f} at the start\n",
        flush=True,
    )
    bw = bandwidth()
    print(f"Memory bandwidth: numpy copy of 1 GiB, best of 3: {bw / 1e9:.1f} GB/s copied\n", flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        path = tmp / "features.npy"
        t = time.perf_counter()
        labels = write_features(path, args.rows, args.dims, args.classes, args.dtype)
        np.save(tmp / "labels.npy", labels)
        print(
            f"Features: {args.rows:,} x {args.dims:,} {args.dtype}, {args.classes} classes, memmapped "
            f"({gb(path.stat().st_size)} GB, written in {time.perf_counter() - t:.0f} s)\n",
            flush=True,
        )
        X = np.load(path, mmap_mode="r")
        results = []
        for c in chunks:
            for n_threads in threads:
                for mode in args.threads_mode.split(",") if n_threads > 1 else ["workers"]:
                    for products in ("int8", "float32") if args.dtype == "uint8" else ("",):
                        timing = functools.partial(
                            time_passes, labels=labels, mode=mode, threads=n_threads, passes=args.passes,
                            chunk_rows=c, products=products,
                        )  # fmt: skip
                        results.append(timing(X, source="memmap"))
                        if args.compute_only:
                            results.append(timing(repeated_chunk(X, c), source="one row, repeated (compute only)"))
        del X
        print(pass_table(bw, results) + "\n", flush=True)
        fits = []
        if args.fit_max_iter:
            fits.append(
                run_child(
                    {
                        "label": "streaming",
                        "kind": "streaming",
                        "X": str(path),
                        "mmap": True,
                        "objective": False,
                        "y": str(tmp / "labels.npy"),
                        "max_iter": args.fit_max_iter,
                        "input": f"{args.dtype} memmap",
                        "shape": f"{args.rows:,} x {args.dims:,}",
                    }
                )
            )
        fits += compare_fits(tmp, args)
        print(fit_table(fits) + "\n", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
