"""Extraction of a trained hierarchical sparse model with its products in bf16 (stage 1's patch
product and the grouped stages' convolution, as convae runs them in inference where the device
computes bf16 natively) against the same model all in fp32.

    .venv/bin/python benchmarks/hsparse_extraction.py [--run benchmarks/runs/cifar10]
        [--dataset cifar10:test] [--data-dir ../shared/datasets] [--images 2000] [--rounds 4] [--threads 2]

Both arms extract what the hierarchical presets' probes read (`stage1` and `stage2`, grid2) from
the same test images, each as a user gets it (`FeatureExtractor(precision="auto")`, and
`precision="float32"`, as `--precision float32`), in its own default batches (fp32 maps are
wider, so its batches can be smaller). Prints the features' disagreement per layer (|bf16 - fp32| over
each feature's standard deviation: mean, 99th percentile, max) and images/s per arm in
interleaved rounds (the host's speed drifts: read the per-round ratios), as Markdown and one
JSON line. On a CPU without native bf16 both arms are fp32 and the script says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from convae import load_model
from convae.data import load_dataset
from convae.features import FeatureExtractor

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets"


def features(extractor: FeatureExtractor, images: np.ndarray) -> tuple[np.ndarray, float]:
    """(features, seconds) of `images`."""
    t = time.perf_counter()
    out = extractor.transform(images)
    return out, time.perf_counter() - t


def disagreement(low: np.ndarray, full: np.ndarray, columns: slice) -> dict:
    scale = full[:, columns].std(0) + 1e-6
    err = np.abs(low[:, columns] - full[:, columns]) / scale
    return {"mean": float(err.mean()), "p99": float(np.quantile(err, 0.99)), "max": float(err.max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=HERE / "runs" / "cifar10", help="a trained hsparse run directory")
    p.add_argument("--dataset", default="cifar10:test", help="the images (a convae dataset spec) the run takes")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.rounds < 1 or args.images < 1:
        p.error("--rounds and --images must be at least 1")
    torch.set_num_threads(args.threads)
    model, config = load_model(args.run)
    if config.model.arch != "hsparse":
        raise SystemExit(f"{args.run}: arch {config.model.arch}, not hsparse")
    images = load_dataset(args.dataset, data_dir=args.data_dir).images[: args.images]
    arms = {arm: FeatureExtractor(model, "stage1,stage2", "grid2", precision=precision)
            for arm, precision in (("bf16", "auto"), ("fp32", "float32"))}  # fmt: skip
    for extractor in arms.values():
        features(extractor, images[:64])  # warm-up: allocations and kernel choices
    rates: dict[str, list[float]] = {"bf16": [], "fp32": []}
    outs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for arm in rates:
            outs[arm], seconds = features(arms[arm], images)
            rates[arm].append(len(images) / seconds)
    blocks = {b.layer: slice(b.start, b.stop) for b in arms["fp32"].blocks}
    errors = {layer: disagreement(outs["bf16"], outs["fp32"], cols) for layer, cols in blocks.items()}
    native = arms["bf16"].bf16
    batches = f"batches of {arms['bf16'].batch_size} (bf16) and {arms['fp32'].batch_size} (fp32)"
    print(f"{args.run} ({args.images} images of {args.dataset}, {batches}, {args.threads} threads; "
          f"native bf16: {native})\n")  # fmt: skip
    print("| layer | mean abs(bf16 - fp32) / std | 99th percentile | max |\n|---|---:|---:|---:|")
    for layer, e in errors.items():
        print(f"| {layer} | {e['mean']:.4f} | {e['p99']:.4f} | {e['max']:.3f} |")
    print("\n| round | bf16 images/s | fp32 images/s | ratio |\n|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(rates["bf16"], rates["fp32"]), start=1):
        print(f"| {i} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    print(json.dumps({"run": str(args.run), "dataset": args.dataset, "images": args.images, "native_bf16": native, "errors": errors,
                      "images_per_s": rates}))  # fmt: skip


if __name__ == "__main__":
    main()
