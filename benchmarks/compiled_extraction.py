"""Extraction with the forward pass compiled (`FeatureExtractor(compile="always")`, torch.compile's
inductor) against the same extractor uncompiled, for each preset's model and the default model
at 96 px.

    .venv/bin/python benchmarks/compiled_extraction.py [--only cifar10,mnist] [--images 2000]
        [--rounds 3] [--threads 2] [--data-dir ../shared/datasets] [--run cifar10=RUN_DIR ...]

Each preset's model is built for its dataset's images (`roofline.preset_net`: untrained, since
training changes the weights, not the work) with the extractor of what its probe reads, or
loaded from a trained run of that preset (`--run PRESET=RUN_DIR`: an untrained hierarchical
model's identity whitening and default groups made its maps cheaper to finish); the
default 96 px model reads every stage on a 4x4 grid (random images). Both arms run in their
default batches, the arms interleaved over `--rounds` rounds of the same images (the host's
speed drifts: read each round's ratio). Prints, per model, the seconds of the first compiled
call (compiling; a second run of the script finds inductor's on-disk cache warm) and the resident
memory it added (after an uncompiled batch: what compiling holds, not the batch's), images/s per
arm and round, and how far the compiled features are from the uncompiled ones (|difference|
over each feature's standard deviation: mean and max), as Markdown and one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from convae import load_model
from convae.data import load_dataset
from convae.features import FeatureExtractor
from convae.models import build_model, default_model_config
from roofline import preset_extractor, preset_net  # benchmarks/ is the script's folder: on sys.path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets"
PRESET_DATA = {
    "mnist": "mnist:test",
    "fashion-mnist": "fashion-mnist:test",
    "cifar10": "cifar10:test",
    "cifar10-patch": "cifar10:test",
    "cifar10-deep": "cifar10:test",
    "mnist-convae": "mnist:test",
}
DEFAULT_96 = "default model, 96 px"


def extractors(name: str, data_dir: str, n: int, run: str | None) -> tuple[dict[str, FeatureExtractor], np.ndarray]:
    """The uncompiled and compiled extractors of `name`'s model (`run`'s, if given), and `n` images it takes."""
    if name == DEFAULT_96:
        torch.manual_seed(0)
        model = build_model(default_model_config((96, 96, 3))).eval()
        layers = model.hierarchy_layers()
        arms = {mode: FeatureExtractor(model, layers, "grid4", compile=mode) for mode in ("never", "always")}
        return arms, np.random.default_rng(0).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    images = load_dataset(PRESET_DATA[name], data_dir=data_dir).images[:n]
    model = preset_net(name, images.shape[1:]) if run is None else load_model(run)[0]
    return {mode: preset_extractor(name, model, mode) for mode in ("never", "always")}, images


def timed(extractor: FeatureExtractor, images: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = extractor.transform(images)
    return out, time.perf_counter() - start


def rss_mb() -> float | None:
    """This process's resident memory now, in MB (Linux's /proc; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def measure(name: str, data_dir: str, n: int, rounds: int, run: str | None = None) -> dict:
    arms, images = extractors(name, data_dir, n, run)
    timed(arms["never"], images[: arms["never"].batch_size])  # warm-up: allocations, kernel choices
    before = rss_mb()  # what compiling adds: the first compiled batch after an uncompiled one
    _, compile_seconds = timed(arms["always"], images[: arms["always"].batch_size])
    after = rss_mb()
    compile_mb = None if before is None or after is None else after - before
    rates: dict[str, list[float]] = {"never": [], "always": []}
    outs: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for mode in rates:
            outs[mode], seconds = timed(arms[mode], images)
            rates[mode].append(len(images) / seconds)
    err = np.abs(outs["always"] - outs["never"]) / (outs["never"].std(0) + 1e-6)
    return dict(model=name, run=run, images=len(images), batch=arms["never"].batch_size, dim=arms["never"].dim,
                compile_seconds=compile_seconds, compile_mb=compile_mb, images_per_s=rates,
                difference=dict(mean=float(err.mean()), max=float(err.max())))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated, of: {', '.join([*PRESET_DATA, 'default96'])}")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--run", action="append", default=[], help="PRESET=RUN_DIR: that preset's trained model")
    args = p.parse_args()
    runs = dict(item.split("=", 1) for item in args.run if "=" in item)
    if len(runs) != len(args.run) or set(runs) - set(PRESET_DATA):
        p.error(f"--run: give PRESET=RUN_DIR, PRESET one of {', '.join(PRESET_DATA)}")
    if args.rounds < 1 or args.images < 1:
        p.error("--rounds and --images must be at least 1")
    names = [*PRESET_DATA, DEFAULT_96]
    if args.only:
        wanted = [DEFAULT_96 if w == "default96" else w for w in args.only.split(",")]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            p.error(f"--only: unknown {', '.join(unknown)}")
        names = wanted
    torch.set_num_threads(args.threads)
    print(f"{args.images} images a round, {args.rounds} rounds, {args.threads} threads\n")
    print(
        "| model | batch | compiling s (MB) | images/s uncompiled | compiled | ratio per round "
        "| mean / max difference (std) |"
    )
    print("|---|---:|---|---|---|---|---|")
    results = []
    for name in names:
        r = measure(name, args.data_dir, args.images, args.rounds, runs.get(name))
        plain, fast = r["images_per_s"]["never"], r["images_per_s"]["always"]
        label = f"{name} (trained)" if r["run"] else name
        memory = "-" if r["compile_mb"] is None else f"{r['compile_mb']:.0f}"
        print(f"| {label} | {r['batch']} | {r['compile_seconds']:.1f} ({memory}) | {' / '.join(f'{v:.0f}' for v in plain)} | "
              f"{' / '.join(f'{v:.0f}' for v in fast)} | {' / '.join(f'{b / a:.2f}' for a, b in zip(plain, fast))} | "
              f"{r['difference']['mean']:.2e} / {r['difference']['max']:.3f} |", flush=True)  # fmt: skip
        results.append(r)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
