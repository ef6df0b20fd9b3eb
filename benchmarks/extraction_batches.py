"""Extraction throughput by batch size: the table behind `auto_batch_size` (features/extractor.py).

    .venv/bin/python benchmarks/extraction_batches.py [--threads 2] [--repeats 3]

Builds each model from its configuration (training changes the weights, not the speed):
the `cifar10-patch` sparse model (1,600 filters, conv1.split/grid2), the `cifar10`
hierarchical model (stage1+stage2/grid2) and the default model at 96 and 128 px (every
stage/grid4), and times ``FeatureExtractor`` on random images at each batch size, the batch
sizes interleaved over `--repeats` rounds (the best round kept: the host's speed drifts).
Prints a Markdown table of images/s, the default batch marked with *.
"""

from __future__ import annotations

import argparse
import time

import torch

from convae.features import FeatureExtractor
from convae.models import ModelConfig, build_model, default_model_config

CASES = {
    "`cifar10-patch`, conv1.split/grid2": (
        lambda: ModelConfig(arch="sparse", in_channels=3, image_size=(32, 32), channels=(1600,), kernel_size=5),
        lambda m: ["conv1.split"],
        "grid2",
    ),
    "`cifar10` (hsparse), stage1+stage2/grid2": (
        lambda: ModelConfig(
            arch="hsparse",
            in_channels=3,
            image_size=(32, 32),
            channels=(800, 1600),
            kernel_size=5,
            groups=32,
            group_size=32,
        ),  # fmt: skip
        lambda m: ["stage1", "stage2"],
        "grid2",
    ),
    "default model at 96 px, every stage/grid4": (
        lambda: default_model_config((96, 96, 3)),
        lambda m: m.hierarchy_layers(),
        "grid4",
    ),
    "default model at 128 px, every stage/grid4": (
        lambda: default_model_config((128, 128, 3)),
        lambda m: m.hierarchy_layers(),
        "grid4",
    ),
}
BATCHES = (1, 2, 4, 5, 8, 16)


def rates(model, layers, pool, repeats: int, images: int = 48) -> dict[int, float]:
    """Best images/s over `repeats` interleaved rounds, per batch size."""
    best: dict[int, float] = {}
    size = model.config.image_size
    for _ in range(repeats):
        for batch in BATCHES:
            extractor = FeatureExtractor(model, layers, pool, batch_size=batch)
            x = torch.rand(batch, model.config.in_channels, *size)
            extractor(x)  # warm-up: allocator and kernels
            calls = max(2, images // batch)
            t0 = time.perf_counter()
            for _ in range(calls):
                extractor(x)
            best[batch] = max(best.get(batch, 0.0), calls * batch / (time.perf_counter() - t0))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="a case's name contains this")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"| model, layers | default batch | {' | '.join(map(str, BATCHES))} |")
    print(f"|---|---:|{'---:|' * len(BATCHES)}")
    for name, (config, layers_of, pool) in CASES.items():
        if args.only and args.only not in name:
            continue
        model = build_model(config()).eval()
        layers = layers_of(model)
        default = FeatureExtractor(model, layers, pool).batch_size
        measured = rates(model, layers, pool, args.repeats)
        cells = [f"{measured[b]:.0f}{'*' if b == default else ''}" for b in BATCHES]
        print(f"| {name} | {default} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
