"""Extraction throughput of the cifar10 preset's sparse model: convae's path against the convolution it replaced.

The sparse model's responses are a matmul over unfolded, contrast-normalized patches, left
channels-last, and its sign split is written in place. The path it replaced (kept here, as the
reference) was a convolution with the whitening folded into its filters, the patch means and
contrasts applied to its K-channel output, and the concatenation `sign_split` was. Both run on the
same model (1,600 filters, whitening fitted on the images; training does not change the
speed) and the same CIFAR-10 test images, `conv1.split` averaged over a 2x2 grid; the script
checks that they agree and prints one JSON line.

    python benchmarks/sparse_extraction.py --data-dir ../shared/datasets --images 2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from convae.data import load_dataset
from convae.features import FeatureExtractor, pool_features
from convae.models import ModelConfig, build_model
from convae.models.sparse import SPARSE_SPLIT_THRESHOLD
from convae.tensors import to_float_nchw

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def convolution_features(model, x: torch.Tensor) -> torch.Tensor:
    """The replaced path: conv with folded whitening, per-position corrections, sign_split, grid2."""
    c, k = model.config.in_channels, model.config.kernel_size
    detectors = model._unit_filters() @ model.whiten
    offset = detectors @ model.patch_mean
    mean, std = model._contrast(x)
    raw = F.conv2d(x, detectors.view(-1, c, k, k))
    z = (raw - mean * detectors.sum(1).view(1, -1, 1, 1)) / std - offset.view(1, -1, 1, 1)
    t = SPARSE_SPLIT_THRESHOLD
    return pool_features(torch.cat([F.relu(z - t), F.relu(-z - t)], dim=1), "grid2")  # the old sign_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--filters", type=int, default=1600)
    args = parser.parse_args()

    images = load_dataset("cifar10:test", data_dir=args.data_dir).images[: args.images]
    model = build_model(
        ModelConfig(arch="sparse", in_channels=3, image_size=(32, 32), channels=(args.filters,), kernel_size=5)
    ).eval()
    model.fit_whitening([to_float_nchw(images[:1000])])
    extractor = FeatureExtractor(model, "conv1.split", "grid2")

    extractor.transform(images[:64])  # warm-up
    start = time.perf_counter()
    fast = extractor.transform(images)
    fast_s = time.perf_counter() - start

    reference = np.empty_like(fast)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), extractor.batch_size):
            x = to_float_nchw(images[i : i + extractor.batch_size])
            reference[i : i + len(x)] = convolution_features(model, x).numpy()
    reference_s = time.perf_counter() - start

    error = float(np.abs(fast - reference).max() / np.abs(reference).max())
    print(
        json.dumps(
            {
                "images": len(images),
                "filters": args.filters,
                "dim": extractor.dim,
                "batch": extractor.batch_size,
                "threads": torch.get_num_threads(),
                "convae_images_per_s": round(len(images) / fast_s, 1),
                "convolution_images_per_s": round(len(images) / reference_s, 1),
                "speed_up": round(reference_s / fast_s, 2),
                "max_relative_difference": error,
            }
        )
    )
    if error > 1e-3:
        raise SystemExit(f"the two paths disagree: max relative difference {error:.2e}")


if __name__ == "__main__":
    main()
