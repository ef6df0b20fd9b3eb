"""Similar images: precision@10 of cosine k-NN retrieval, test split queries against the train split.

    .venv/bin/python benchmarks/neighbors.py --data-dir ../shared/datasets --split validation \\
        [--datasets fashion-mnist,cifar10] [--out FILE.json]
    .venv/bin/python benchmarks/neighbors.py --split test --select benchmarks/neighbors-validation.json ...

For each dataset, a model is trained on the train split (``convae fit DATA:train`` with
``--max-time`` seconds on one thread: Fashion-MNIST's ConvAE preset, CIFAR-10's default ConvAE; or an
existing run given with ``--run DATA=RUN_DIR``); then every query image's
10 nearest index images by cosine similarity of one layer's pooled features are found exactly
(:func:`convae.analysis.find_neighbors`), and precision@10 is the mean fraction of them that
share the query's label. Beside it, on the same images: raw pixels, and the same architecture
with random weights (batch-norm statistics measured on the index images).

``--split validation`` never touches the test split: the last 10,000 train images are the
queries and the first 40,000 (CIFAR-10) or 50,000 (Fashion-MNIST) the index, and every layer
and pooling is measured. ``--split test``
queries the test split against the whole train split once, with the layer and pooling
``--select`` names (the best on validation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets"
CONVAE = shutil.which("convae", path=str(Path(sys.executable).parent)) or "convae"
POOLS = ("avg", "grid2", "grid4")
K = 10
# What each dataset's model is trained with here: Fashion-MNIST's ConvAE preset (the fashion-mnist
# preset when this was measured); for CIFAR-10 the default ConvAE (the sparse presets' thousands of
# filters take too long to extract on one core).
FIT = {"fashion-mnist": ["--preset", "fashion-mnist-convae"]}


def train(name: str, runs: Path, data_dir: Path, max_time: float) -> tuple[Path, float, list[str]]:
    out = runs / f"neighbors-{name}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [CONVAE, "fit", f"{name}:train", *FIT.get(name, []), "--max-time", str(max_time), "--out", str(out)]
    cmd += ["--data-dir", str(data_dir), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return out, time.perf_counter() - t0, cmd


def measure(run: Path, index, query, blocks: list[tuple[str, str]]) -> list[dict]:
    """precision@10 of each block's features, of the same blocks with random weights, and of pixels:
    one forward pass over the images per model serves every block."""
    import numpy as np

    import convae
    from convae.analysis import PixelFeatures, nearest, precision_at_k, untrained_extractor
    from convae.features import FeatureExtractor

    model, _ = convae.load_model(run)
    pools = {b[1] for b in blocks}
    y_index, y_query = np.asarray(index.labels), np.asarray(query.labels)
    rows = []
    sources = [(name, layer) for name in ("convae", "random") for layer in dict.fromkeys(b[0] for b in blocks)]
    for name, layer in [*sources, ("pixels", None)]:  # one layer at a time: a CIFAR-10 layer's poolings are ~1 GB
        if name == "pixels":
            ex = PixelFeatures(index.image_shape)
        elif name == "random":
            ex = untrained_extractor(model, layer, pools, index.images, None)
        else:
            ex = FeatureExtractor(model, layer, pools)
        t0 = time.perf_counter()
        ref, q = ex.transform(index.images), ex.transform(query.images)
        extract_s = time.perf_counter() - t0
        if name == "pixels":
            parts = [("", slice(None))]
        else:
            parts = [(b.layer + "/" + b.pool, b.columns) for b in ex.blocks if (b.layer, b.pool) in blocks]
        for label, cols in parts:
            t0 = time.perf_counter()
            found = nearest(np.ascontiguousarray(q[:, cols]), np.ascontiguousarray(ref[:, cols]), K)
            p = precision_at_k(found, y_query, y_index)
            rows.append(
                dict(
                    features=f"{name}/{label}".rstrip("/"),
                    precision_at_10=p,
                    extract_seconds=extract_s,
                    search_seconds=time.perf_counter() - t0,
                )
            )
            print(rows[-1], flush=True)
        del ref, q
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--datasets", default="fashion-mnist,cifar10")
    ap.add_argument("--split", choices=("validation", "test"), default="validation")
    ap.add_argument("--select", type=Path, help="validation JSON the test run takes its layer and pooling from")
    ap.add_argument("--run", action="append", default=[], help="DATA=RUN_DIR: use this run instead of training one")
    ap.add_argument("--max-time", type=float, default=600.0, help="training budget (s) of each model trained here")
    ap.add_argument("--runs", type=Path, default=HERE / "runs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.split == "test" and args.select is None:
        ap.error("--split test needs --select VALIDATION.json: the layer and pooling are chosen on validation only")
    import numpy as np
    import torch

    import convae
    from convae._io import atomic_write_text

    given = dict(r.split("=", 1) for r in args.run)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"datasets": {}}
    doc["machine"] = dict(
        platform=platform.platform(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
    )
    for name in args.datasets.split(","):
        if name in given:
            run, seconds, cmd = Path(given[name]), None, None
        else:
            run, seconds, cmd = train(name, args.runs, args.data_dir, args.max_time)
        train_data = convae.load_dataset(name, "train", data_dir=args.data_dir, download=False)
        if args.split == "validation":
            index, query = (
                train_data.subset(np.arange(len(train_data) - 10_000)),
                train_data.subset(np.arange(len(train_data) - 10_000, len(train_data))),
            )
            model, _ = convae.load_model(run)
            blocks = [(layer, pool) for layer in model.hierarchy_layers() for pool in POOLS]
        else:
            index, query = train_data, convae.load_dataset(name, "test", data_dir=args.data_dir, download=False)
            best = max(
                json.loads(args.select.read_text())["datasets"][name]["rows"],
                key=lambda r: r["precision_at_10"] if r["features"].startswith("convae/") else -1,
            )
            blocks = [tuple(best["features"].split("/")[1:3])]
        rows = measure(run, index, query, blocks)
        doc["datasets"][name] = dict(
            split=args.split, run=str(run), train_seconds=seconds, train_command=cmd, rows=rows
        )
        atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
