"""Photo-sized defaults on the test folder: `convae fit` a JPEG folder with the default model for
its size and a training budget, then `convae probe` it, as a user would (issue 26).

    .venv/bin/python benchmarks/photo_defaults.py [--size 96] [--minutes 10] [--threads 2]
        [--widths 64,128,256,256,256] [--name default] [--data-dir ../shared/datasets]

The defaults themselves are chosen on a validation split held out from the train folder:

    .venv/bin/python benchmarks/validate.py benchmarks/runs/photos-96 \\
        benchmarks/candidates/photos-96.json --val 2000 --split stratified --threads 1

This script scores the chosen configuration once on the test folder: the folder's train images
(benchmarks/photo_folders.py: upsampled CIFAR-10, written if missing) train the model for
--minutes, then logistic regression on every stage's and the bottleneck's features (grid4)
fitted on those images' labels scores the test folder, beside the same net with random weights
and the pixels. Each run's row (wall time, peak memory, images seen, the probe's rows) is added
to benchmarks/photo-defaults.json under --name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

from convae._io import atomic_write_text
from convae.run import read_history
from photo_folders import DEFAULT_DATA, write_photo_folder
from quality import CONVAE, timed

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "photo-defaults.json"


def measure(folder: Path, run: Path, args) -> dict:
    fit = [CONVAE, "fit", str(folder / "train"), "--out", str(run), "--max-time", str(args.minutes * 60)]
    fit += ["--threads", str(args.threads), "--quiet"] + (["--widths", args.widths] if args.widths else [])
    fit_seconds, fit_gb = timed(fit)
    seen = sum(int(row["images"]) for row in read_history(run))
    out = run.parent / f"{run.name}-probe.json"
    probe = [CONVAE, "probe", str(run), "--train", str(folder / "train"), "--test", str(folder / "test")]
    probe += ["--baselines", "random,pixels", "-o", str(out), "--quiet"]
    probe_seconds, probe_gb = timed(probe)
    rows = json.loads(out.read_text())["rows"]
    config = json.loads((run / "config.json").read_text())
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        fit_command=fit, probe_command=probe, channels=config["model"]["channels"],
        fit_seconds=round(fit_seconds, 1), fit_peak_gb=round(fit_gb, 2), images_seen=seen,
        probe_seconds=round(probe_seconds, 1), probe_peak_gb=round(probe_gb, 2),
        rows=[{k: r[k] for k in ("features", "dim", "accuracy")} for r in rows],
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", help="instead of the default model's widths, e.g. the defaults before")
    ap.add_argument("--name", default="default")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    folder = write_photo_folder(args.size, data_dir=args.data_dir)
    run = folder.parent / f"photos-{args.size}-{args.name}"
    shutil.rmtree(run, ignore_errors=True)  # a run of this script's own, under benchmarks/runs
    row = measure(folder, run, args)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[f"{args.size}px/{args.name}"] = row
    atomic_write_text(RESULTS, json.dumps(results, indent=1) + "\n")
    for r in row["rows"]:
        print(f"{r['features']:>24} {r['dim']:>6} {r['accuracy']:.4f}")
    print({k: v for k, v in row.items() if k not in ("rows", "fit_command", "probe_command")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
