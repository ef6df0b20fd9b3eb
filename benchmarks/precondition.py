"""The probe's logistic regression (or linear SVM) with and without `precondition`, on a feature file.

    .venv/bin/python -m convae extract RUN cifar10:train --layers stage1,stage2 --pool grid2 \
        --dtype float16 --data-dir ../shared/datasets -o /tmp/cifar10-train.npy
    .venv/bin/python benchmarks/precondition.py /tmp/cifar10-train.npy [--holdout 10000]
        [--classifier logreg] [--c-scale 4] [--max-iter 300] [--tol 1e-4] [--arms plain,precondition]
        [--block-columns N] [--threads 2]

Fits the classifier the probe builds (`convae.probe.classifiers.CLASSIFIERS`: C x `--c-scale`,
standardized) on all rows of a 16-bit feature file but the last `--holdout` (memory-mapped, as
`convae probe` reads them), once per arm, and prints for each: L-BFGS's iterations and passes over
the rows, the seconds of the fit, the objective reached (scikit-learn's ``C * sum(loss) +
||W||^2 / 2`` on the standardized weights: the same function in both arms) and the accuracy on the
held-out rows (labels from the file's `.labels.npy`). Both arms minimize one objective; what differs
is how many passes they take to get near its minimum. The held-out rows are a validation split
only when the model behind the file never saw those images (`benchmarks/validate.py
--save-runs`); otherwise read their accuracy as a check that the arms agree, not as a score.
`--block-columns N` gives the preconditioner blocks of N columns whatever memory they take (by
default they narrow so that their factors fit in 128 MB). Prints Markdown and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import convae.probe.linear as linear
from convae.probe.classifiers import CLASSIFIERS

ARMS = {"plain": False, "precondition": True}


def fit_arm(X: np.ndarray, y: np.ndarray, n_fit: int, args, precondition: bool) -> dict:
    clf = CLASSIFIERS[args.classifier](0, n_fit, X.shape[1], args.c_scale, args.max_iter)
    clf.set_params(tol=args.tol, precondition=precondition)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fit stopped at max_iter is reported by its iterations
        clf.fit(X[:n_fit], y[:n_fit])
    seconds = time.perf_counter() - t0
    hits = sum(
        int(np.sum(clf.predict(np.asarray(X[a : a + 2000], dtype=np.float32)) == y[a : a + 2000]))
        for a in range(n_fit, len(X), 2000)
    )
    return dict(
        iterations=int(np.max(clf.n_iter_)),
        passes=int(clf.n_passes_),
        fit_seconds=round(seconds, 1),
        objective=round(float(clf.objective_), 4),
        holdout_accuracy=round(hits / max(len(X) - n_fit, 1), 4),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("features", type=Path, help="a .npy feature file with its .labels.npy beside it")
    ap.add_argument("--holdout", type=int, default=10_000, help="last rows scored, not fitted")
    ap.add_argument("--classifier", choices=("logreg", "linsvm"), default="logreg")
    ap.add_argument("--c-scale", type=float, default=4.0)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--arms", default="plain,precondition")
    ap.add_argument("--block-columns", type=int, help="preconditioner blocks of this many columns")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    X = np.load(args.features, mmap_mode="r")
    if args.block_columns:  # the widths the module would choose are bounded by their memory: lift the bound
        linear._PRECONDITION_BLOCK_COLUMNS = args.block_columns
        linear._PRECONDITION_BYTES = 4 * args.block_columns * X.shape[1]
    y = np.load(args.features.with_name(args.features.stem + ".labels.npy"))
    n_fit = len(X) - args.holdout
    rows = {arm: fit_arm(X, y, n_fit, args, ARMS[arm]) for arm in args.arms.split(",")}
    print(f"{n_fit:,} x {X.shape[1]:,} {X.dtype} rows fitted, {args.holdout:,} held out; {args.classifier}, "
          f"C x{args.c_scale:g}, max_iter {args.max_iter}, tol {args.tol:g}, {args.threads} threads\n")  # fmt: skip
    print("| arm | iterations | passes | fit s | objective | held-out accuracy |\n|---|---:|---:|---:|---:|---:|")
    for arm, r in rows.items():
        print(
            f"| {arm} | {r['iterations']} | {r['passes']} | {r['fit_seconds']} | {r['objective']} | "
            f"{r['holdout_accuracy']:.4f} |"
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("features", "arms")}
    print(json.dumps(dict(features=str(args.features), shape=list(X.shape), **settings, arms=rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
