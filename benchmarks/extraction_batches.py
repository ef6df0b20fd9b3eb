"""Extraction throughput by batch size: the table behind `auto_batch_size` (features/extractor.py).

    .venv/bin/python benchmarks/extraction_batches.py [--threads 2] [--repeats 3] [--only mnist]
        [--batches 1,2,4,8,16,24,48]

Builds each preset's model for its dataset's image size, with the extractor of what its probe
reads (`roofline.preset_model`: training changes the weights, not the speed), and the default
model at 96 and 128 px (every stage/grid4), and times ``FeatureExtractor`` on random images at
each batch size for at least half a second, the batch sizes interleaved over `--repeats` rounds
(the best round kept: the host's speed drifts). Prints a Markdown table of images/s, the default
batch marked with *.
"""

from __future__ import annotations

import argparse
import time

import torch

from convae._memory import keep_freed_memory
from convae.features import FeatureExtractor
from convae.models import build_model, default_model_config
from roofline import preset_model  # benchmarks/ is the script's folder: on sys.path

PRESET_SHAPES = {
    "mnist": (28, 28, 1),
    "fashion-mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar10-patch": (32, 32, 3),
}


def _default_model(size: int):
    torch.manual_seed(0)
    model = build_model(default_model_config((size, size, 3))).eval()
    return model, FeatureExtractor(model, model.hierarchy_layers(), "grid4")


def cases() -> dict:
    """Name -> a function building (model, extractor at its default batch)."""
    out = {
        f"`{p}` preset, {'x'.join(map(str, s[:2]))} px": (lambda p=p, s=s: preset_model(p, s))
        for p, s in PRESET_SHAPES.items()
    }
    for size in (96, 128):
        out[f"default model at {size} px, every stage/grid4"] = lambda size=size: _default_model(size)
    return out


BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24)


def rates(model, base: FeatureExtractor, repeats: int, batches=BATCHES, seconds: float = 0.5) -> dict[int, float]:
    """Best images/s over `repeats` interleaved rounds, per batch size."""
    best: dict[int, float] = {}
    size = model.config.image_size
    for _ in range(repeats):
        for batch in batches:
            extractor = FeatureExtractor(model, base.layers, base.pools, batch_size=batch, keep_order=True)
            x = torch.rand(batch, model.config.in_channels, *size)
            extractor(x)  # warm-up: allocator and kernels
            calls, t0 = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - t0 < seconds:
                extractor(x)
                calls += 1
            best[batch] = max(best.get(batch, 0.0), calls * batch / (time.perf_counter() - t0))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="a case's name contains this")
    ap.add_argument("--batches", help=f"comma-separated batch sizes (default: {','.join(map(str, BATCHES))})")
    args = ap.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else BATCHES
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as FeatureExtractor.batches, which `convae extract` and `probe` run
    print(f"| model, layers | default batch | {' | '.join(map(str, batches))} |")
    print(f"|---|---:|{'---:|' * len(batches)}")
    for name, build in cases().items():
        if args.only and args.only not in name:
            continue
        model, extractor = build()
        default = extractor.batch_size
        measured = rates(model, extractor, args.repeats, batches)
        cells = [f"{measured[b]:.0f}{'*' if b == default else ''}" for b in batches]
        print(f"| {name} | {default} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
