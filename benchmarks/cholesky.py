"""The whitening's Cholesky factor by backend and size: where the bundled OpenBLAS crashes, what MKL costs.

    .venv/bin/python benchmarks/cholesky.py [--columns 9600,26000,26700,28800] [--threads 2]

For each size, each backend factors the same float32, Fortran-ordered, diagonally dominant matrix
in place as the probe's whitening does (`probe.linear._upper_cholesky`): "openblas" is scipy's
`cholesky(overwrite_a=True)`, "mkl" torch's `cholesky_ex(out=)`. Each runs in its own subprocess, so
a segfault is a row ("crashed, signal 11"), not the end of the script; it prints seconds and the
process's peak memory above the matrix. Chose `_OPENBLAS_CHOLESKY_COLUMNS` (RESULTS.md, "The
whitening's Cholesky factor of wide matrices").
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def factor_once(backend: str, n: int, threads: int) -> None:
    import numpy as np
    import torch
    from scipy.linalg import cholesky
    from threadpoolctl import threadpool_limits

    cov = np.zeros((n, n), dtype=np.float32, order="F")
    cov[np.diag_indices(n)] = 2.0
    cov[0, 1:] = 1e-3  # off the diagonal, in the upper triangle the factorization reads
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if backend == "openblas":
        with threadpool_limits(threads, user_api="blas"):
            cholesky(cov, lower=False, overwrite_a=True, check_finite=False)
    else:
        torch.set_num_threads(threads)
        factor = torch.from_numpy(cov)  # column-major: factored in cov's own memory
        torch.linalg.cholesky_ex(factor, upper=True, out=(factor, torch.empty((), dtype=torch.int32)))
    seconds = time.perf_counter() - t0
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e6  # kB on Linux
    print(f"{seconds:.2f} s, +{extra:.2f} GB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--columns", default="9600,26000,26700,28800")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        factor_once(args.one[0], int(args.one[1]), args.threads)
        return
    print(f"| columns | openblas ({args.threads} threads) | mkl ({args.threads} threads) |\n|---:|---|---|")
    for n in (int(c) for c in args.columns.split(",")):
        cells = []
        for backend in ("openblas", "mkl"):
            cmd = [sys.executable, __file__, "--one", backend, str(n), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            cells.append(proc.stdout.strip() if proc.returncode == 0 else f"crashed ({proc.returncode})")
        print(f"| {n:,} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
