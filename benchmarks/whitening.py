"""The whitened probe's covariance in bf16 tile products against OpenBLAS's float32 syrk.

    .venv/bin/python -m convae extract benchmarks/runs/mnist mnist:train --layers stage1,stage2 \
        --pool grid2 --dtype float16 --data-dir ../shared/datasets -o /tmp/mnist-train.npy
    .venv/bin/python benchmarks/whitening.py /tmp/mnist-train.npy [--rows 30000] [--rounds 2]
        [--validate 10000 [--whiten-rows all,auto,20000]] [--threads 2]

Times ``convae.probe.linear._covariance`` on the first `--rows` rows of a 16-bit feature file
(what `convae probe` reads, memory-mapped) with the bf16 path (where the CPU computes bf16
natively) and with it turned off, in interleaved rounds (the host's speed drifts), and prints how
far the two covariances are apart. With `--validate N` it also fits the probe's whitened logistic
regression (C x4, as the mnist preset's probe) on all rows but the last N of the file, once per
arm, and scores those N (a validation split: the labels come from the file's `.labels.npy`);
with `--whiten-rows` as well, once per value of the classifier's `whiten_rows` (the rows its
covariance is computed from; "all" is None), `--rounds` times each, interleaved, with the default
covariance arm. For a validation split the file must come from a model that never saw those N
images: `benchmarks/validate.py ... --save-runs DIR` trains one on the train split less its last N
images and saves it, then `convae extract DIR/RUN DATASET:train ...` writes the file.
Prints Markdown and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import convae.probe.linear as linear
from convae.probe.classifiers import CLASSIFIERS

ARMS = {"bf16": linear._BF16_COVARIANCE_COLUMNS, "fp32": 1 << 62}  # the width from which bf16 is used


@contextmanager
def arm_of(arm: str):
    """convae's covariance with the bf16 path on ("bf16", where native) or off ("fp32"), restored after."""
    before = linear._BF16_COVARIANCE_COLUMNS
    linear._BF16_COVARIANCE_COLUMNS = ARMS[arm]
    try:
        yield
    finally:
        linear._BF16_COVARIANCE_COLUMNS = before


def covariance(rows, mean, scale, arm: str) -> tuple[np.ndarray, float]:
    with arm_of(arm):
        t = time.perf_counter()
        cov = np.triu(linear._covariance(rows, mean, scale))
        return cov, time.perf_counter() - t


def validate(X: np.ndarray, y: np.ndarray, held_out: int) -> dict:
    fit_x, fit_y, val_x, val_y = X[:-held_out], y[:-held_out], X[-held_out:], y[-held_out:]
    out = {}
    for arm in ARMS:
        clf = CLASSIFIERS["logreg"](0, len(fit_y), X.shape[1], 4.0, 300).set_params(whiten=0.1)
        with arm_of(arm):
            t = time.perf_counter()
            clf.fit(fit_x, fit_y)
            seconds = time.perf_counter() - t
        out[arm] = {"accuracy": float(np.mean(clf.predict(val_x) == val_y)), "fit_seconds": seconds,
                    "iterations": int(np.max(clf.n_iter_))}  # fmt: skip
    return out


def validate_rows(X: np.ndarray, y: np.ndarray, held_out: int, values: list, rounds: int) -> dict:
    """Validation accuracy and fit seconds of the whitened probe per `whiten_rows` value."""
    fit_x, fit_y, val_x, val_y = X[:-held_out], y[:-held_out], X[-held_out:], y[-held_out:]
    out: dict[str, dict] = {str(v): {"fit_seconds": []} for v in values}
    for _ in range(rounds):
        for v in values:
            clf = CLASSIFIERS["logreg"](0, len(fit_y), X.shape[1], 4.0, 300)
            clf.set_params(whiten=0.1, whiten_rows=v)
            t = time.perf_counter()
            clf.fit(fit_x, fit_y)
            out[str(v)]["fit_seconds"].append(time.perf_counter() - t)
            out[str(v)]["accuracy"] = float(np.mean(clf.predict(val_x) == val_y))
            out[str(v)]["iterations"] = int(np.max(clf.n_iter_))
    return out


def _rows_value(text: str):
    return None if text == "all" else text if text == "auto" else int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("features", type=Path, help="a 16-bit .npy of features, e.g. from `convae extract --dtype float16`")
    p.add_argument("--rows", type=int, default=30_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--validate", type=int, default=0, help="hold out this many last rows and fit on the rest")
    p.add_argument("--whiten-rows", help="with --validate: whiten_rows values to compare, e.g. all,auto,20000")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    X = np.load(args.features, mmap_mode="r")
    part = X[: args.rows]
    rows = linear._Rows(part, torch.device("cpu"), None, args.threads, args.threads)
    mean, var = linear._column_stats(rows)
    scale = linear._scale(mean, var, rows.n)
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    covs = {}
    for _ in range(args.rounds):
        for arm in ARMS:
            covs[arm], s = covariance(rows, mean, scale, arm)
            seconds[arm].append(s)
    diff = covs["bf16"] - covs["fp32"]
    apart = {
        "relative_frobenius": float(np.linalg.norm(diff) / np.linalg.norm(covs["fp32"])),
        "diagonal_max_relative": float(
            np.max(np.abs(np.diagonal(diff)) / np.maximum(np.diagonal(covs["fp32"]), 1e-12))
        ),
    }
    del covs, diff
    native = linear.bf16_products(torch.device("cpu"))
    print(
        f"{args.features}: {len(part):,} x {X.shape[1]:,} ({X.dtype}), {args.threads} threads; native bf16: {native}\n"
    )
    print("| round | bf16 tiles s | float32 syrk s | ratio |\n|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(seconds["bf16"], seconds["fp32"]), start=1):
        print(f"| {i} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    print(f"\nbf16 - float32: {apart['relative_frobenius']:.2e} of the covariance's norm (Frobenius); "
          f"diagonal at most {apart['diagonal_max_relative']:.2e} apart (relative)")  # fmt: skip
    result = {"features": str(args.features), "rows": len(part), "dim": X.shape[1], "native_bf16": native,
              "seconds": seconds, **apart}  # fmt: skip
    if args.validate:
        labels = args.features.with_name(args.features.name.removesuffix(".npy") + ".labels.npy")
        result["validation"] = validate(X, np.load(labels), args.validate)
        print("\n| covariance | validation accuracy | whitened fit s | L-BFGS iterations |\n|---|---:|---:|---:|")
        for arm, v in result["validation"].items():
            print(f"| {arm} | {v['accuracy']:.4f} | {v['fit_seconds']:.1f} | {v['iterations']} |")
        if args.whiten_rows:
            values = [_rows_value(v) for v in args.whiten_rows.split(",")]
            result["whiten_rows"] = validate_rows(X, np.load(labels), args.validate, values, args.rounds)
            print("\n| whiten_rows | validation accuracy | whitened fit s, each round | L-BFGS iterations |")
            print("|---|---:|---|---:|")
            for v, r in result["whiten_rows"].items():
                times = ", ".join(f"{t:.1f}" for t in r["fit_seconds"])
                print(f"| {v} | {r['accuracy']:.4f} | {times} | {r['iterations']} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
