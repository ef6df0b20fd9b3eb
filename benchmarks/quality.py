"""Quality benchmark: linear probes on the features of each dataset's preset, beside baselines.

    .venv/bin/python benchmarks/quality.py [--data-dir ../shared/datasets] [--datasets digits,mnist,...]
        [--max-time SECONDS] [--threads 2] [--runs benchmarks/runs] [--no-write] [--from-json]

For each dataset: `convae fit DATA --preset NAME` (timed, wall clock, in a subprocess, as a user
runs it), then the probe of the preset's layers with logistic regression on StandardScaler'd
features (whitened as well where the preset's probe says normalize="whiten"), fitted on the train split and scored on the official test split (digits: the fixed
stratified 80/20 split), with 10 and 100 labels per class (3 seeds) and all labels, beside:
the same architecture with random weights, raw pixels, and PCA of the pixels with as many
dimensions as the bottleneck code (capped below the pixel count). Writes the "## Quality"
section of benchmarks/RESULTS.md (other sections are kept) and the raw rows to
benchmarks/quality.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets"
CONVAE = shutil.which("convae", path=str(Path(sys.executable).parent)) or "convae"

# dataset -> (preset, test-accuracy target with all labels, reference results)
TARGETS = {
    "digits": (0.98, "BernoulliRBM + logreg ≈ 0.93 (scikit-learn example)"),
    "mnist": (0.993, "raw pixels ≈ 0.92; FC winner-take-all AE + linear SVM 0.988"),
    "fashion-mnist": (0.915, "pixels + logreg ≈ 0.845; RBF SVM on pixels 0.897"),
    "cifar10": (0.80, "k-means single layer + linear SVM 0.796; sparse AE 0.734; pixels ≈ 0.40"),
}

# The section's hand-written notes start with this line; a rewrite of the section keeps them.
NOTES_START = "Notes ("


def run_fit(
    name: str, data_dir: Path, runs: Path, threads: int, max_time: float | None
) -> tuple[Path, float, list[str]]:
    out = runs / name
    if out.exists():
        shutil.rmtree(out)
    cmd = [CONVAE, "fit", name, "--preset", name, "--out", str(out), "--data-dir", str(data_dir), "--quiet"]
    if threads:
        cmd += ["--threads", str(threads)]
    if max_time:
        cmd += ["--max-time", str(max_time)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return out, time.perf_counter() - t0, cmd


def probe_dataset(name: str, run: Path, data_dir: Path, labels_per_class) -> tuple[list[dict], float, dict]:
    from convae.data import load_dataset
    from convae.models import code_size
    from convae.presets import get_preset
    from convae.probe import run_probe
    from convae.run import load_config

    preset = get_preset(name)
    config = load_config(run)
    train = load_dataset(name, "train", data_dir=data_dir, download=False)
    test = load_dataset(name, "test", data_dir=data_dir, download=False)
    code = code_size(config.model)
    normalize = preset.probe.get("normalize", "standard")
    t0 = time.perf_counter()
    rows = run_probe(
        run,
        train,
        test,
        layers=preset.probe["layers"],
        pool=preset.probe["pool"],
        classifiers="logreg",
        baselines="random,pixels,pca",
        labels_per_class=labels_per_class,
        seeds=3,
        normalize=normalize,
        augment=preset.probe.get("augment", "none"),
        c_scale=preset.probe.get("c_scale", 1.0),
        max_iter=preset.probe.get("max_iter"),
        pca_dims=[code],
        device="cpu",
    )
    info = dict(
        code_size=code,
        train_images=len(train),
        test_images=len(test),
        normalize=normalize,
        epochs=None,
        model=dict(
            channels=list(config.model.channels),
            convs_per_stage=config.model.convs_per_stage,
            decoder=config.model.decoder,
        ),
    )
    hist = run / "history.csv"
    if hist.exists():
        # Passes over the training images, fractional: a time budget stops mid-epoch.
        from convae.train import split_train_val

        with open(hist, newline="") as f:
            seen = sum(int(row["images"]) for row in csv.DictReader(f))
        train_idx, _ = split_train_val(len(train), config.train.val_fraction, config.train.seed)
        info["epochs"] = round(seen / len(train_idx), 1)
    return rows, time.perf_counter() - t0, info


def summarize(name: str, rows: list[dict]) -> dict:
    """Best trained layer, best random layer, pixels and PCA, per labels-per-class."""
    out = {}
    for k in dict.fromkeys(r["labels_per_class"] for r in rows):
        sub = [r for r in rows if r["labels_per_class"] == k]
        trained = [r for r in sub if not r["features"].startswith(("random/", "pixels", "pca"))]
        random = [r for r in sub if r["features"].startswith("random/")]
        best = max(trained, key=lambda r: r["accuracy"])
        brand = max(random, key=lambda r: r["accuracy"]) if random else None
        code = [r for r in trained if r["features"].startswith("bottleneck")]
        pixels, pca = (next((r for r in sub if r["features"] == name), None) for name in ("pixels", "pca"))
        out[str(k)] = dict(best=best, random=brand, code=code[0] if code else None, pixels=pixels, pca=pca)
    return out


def fmt(r) -> str:
    return "–" if r is None else f"{r['accuracy']:.4f}"


def section(results: dict, meta: dict, notes: str = "") -> str:
    lines = ["## Quality", ""]
    dates = {}
    for name, res in results.items():
        dates.setdefault(res.get("meta", meta)["date"], []).append(name)
    when = "; ".join(f"{d} ({', '.join(names)})" for d, names in dates.items()) if len(dates) > 1 else meta["date"]
    lines += [
        f"Measured {when} on {meta['machine']} ({meta['cpus']} CPU cores, nothing else running; the host's "
        f"speed varied by up to 1.5x between runs), Python {meta['python']}, torch {meta['torch']}, scikit-learn "
        f"{meta['sklearn']}, convae {meta['convae']}, {meta['threads']} torch threads.",
        "",
        "Logistic regression (`convae probe`'s logreg: C = 64/dim, lbfgs, max_iter=300) on StandardScaler'd frozen "
        "features (column `features`: `whiten` where the preset's probe whitens them as well, `probe.Whitener`, "
        "eps 0.1, for every row fitted on all labels; the 10- and 100-label columns stay standardized), "
        "fitted on the train split, scored on the test split: the official ones for MNIST, Fashion-MNIST "
        "and CIFAR-10 (60,000/10,000 and 50,000/10,000 images), the fixed stratified 80/20 split for digits. "
        "(The Fashion-MNIST .gz files here differ in size from Zalando's release, perhaps recompressed; they hold "
        "the official 60,000/10,000 images, 6,000/1,000 per class.) 10 and 100 labels per class: "
        "mean of 3 label subsets. `random` is the same architecture with untrained weights at the same layers; "
        "PCA has the bottleneck code's dimension (capped below the pixel count).",
        "",
        "| dataset | preset | train (s, wall) | epochs | probe (s) | features | best trained layer | acc | random weights | pixels | code | PCA (dim) | 100/class: trained / random / PCA | 10/class: trained / random / PCA | target | met |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for name, res in results.items():
        s = res["summary"]
        a = s.get("all", {})
        target, _ = TARGETS[name]
        low = []
        for k in ("100", "10"):
            t = s.get(k)
            low.append("–" if t is None else f"{fmt(t['best'])} / {fmt(t['random'])} / {fmt(t['pca'])}")
        met = a.get("best") is not None and a["best"]["accuracy"] >= target
        pca_dim = a["pca"]["dim"] if a.get("pca") else "–"
        lines.append(
            f"| {name} | `{name}` | {res['fit_seconds']:.0f} | {res['info']['epochs']} | {res['probe_seconds']:.0f} | "
            f"{res['info'].get('normalize', 'standard')} | {a['best']['features']} ({a['best']['dim']}) | {fmt(a['best'])} | {fmt(a.get('random'))} | "
            f"{fmt(a.get('pixels'))} | {fmt(a.get('code'))} | {fmt(a.get('pca'))} ({pca_dim}) | {low[0]} | {low[1]} | "
            f"{target} | {'yes' if met else 'no'} |"
        )
    lines += [
        "",
        "Reference results: " + "; ".join(f"{n}: {TARGETS[n][1]}" for n in results),
        "",
        "Commands:",
        "",
        "```",
    ]
    for res in results.values():
        lines.append(" ".join(Path(c).name if i == 0 else c for i, c in enumerate(res["command"])))
    lines += [
        "```",
        "",
        "then, in Python, `convae.probe.run_probe(run, train, test, layers=PRESET.probe['layers'], "
        "pool=PRESET.probe['pool'], normalize=PRESET.probe.get('normalize', 'standard'), baselines='random,pixels,pca', "
        "labels_per_class=(10, 100, 'all'), pca_dims=[code_size(config.model)])`; all of it: `.venv/bin/python benchmarks/quality.py`.",
        "",
        notes,
        "",
    ]
    return "\n".join(lines)


def current_notes(text: str, title: str) -> str:
    """The hand-written notes of the `## title` section of `text` (from NOTES_START to the next `## `)."""
    m = re.search(rf"^## {re.escape(title)}\n.*?^({re.escape(NOTES_START)}.*?)(?=^## |\Z)", text, re.S | re.M)
    return m.group(1).rstrip("\n") if m else ""


def replace_section(text: str, title: str, body: str) -> str:
    """`text` with its `## title` section (up to the next `## `) replaced by `body`, or `body` appended."""
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        return pattern.sub(lambda m: body.rstrip("\n") + "\n\n", text, count=1)
    if not text.strip():
        text = "# convae benchmarks\n\n"
    return text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"


def meta_info(threads: int) -> dict:
    import sklearn
    import torch

    import convae

    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        cpus=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        sklearn=sklearn.__version__,
        convae=convae.__version__,
        threads=threads,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--datasets", default="digits,mnist,fashion-mnist,cifar10")
    p.add_argument("--max-time", type=float, default=None, help="Override every preset's training budget (s).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--labels-per-class", default="10,100,all")
    p.add_argument("--no-write", action="store_true", help="Print the section instead of writing RESULTS.md.")
    p.add_argument("--from-json", action="store_true", help="Rewrite the section from quality.json; run nothing.")
    p.add_argument(
        "--reuse-runs",
        action="store_true",
        help="Probe the runs already in --runs (trained by this script; their fit time is kept from quality.json) "
        "instead of training them again.",
    )
    args = p.parse_args()
    if args.from_json:
        args.datasets = ""

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results_path, raw_path = HERE / "RESULTS.md", HERE / "quality.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    for name in filter(None, args.datasets.split(",")):
        reuse = args.reuse_runs and (args.runs / name / "model.safetensors").exists() and name in raw
        if reuse:
            run, fit_s, cmd = args.runs / name, raw[name]["fit_seconds"], raw[name]["command"]
        else:
            run, fit_s, cmd = run_fit(name, args.data_dir, args.runs, args.threads, args.max_time)
        rows, probe_s, info = probe_dataset(name, run, args.data_dir, args.labels_per_class)
        meta = meta_info(args.threads)
        if reuse:
            meta["date"] += f" (probe; trained {raw[name].get('meta', {}).get('date', 'earlier')})"
        raw[name] = dict(
            command=cmd,
            fit_seconds=fit_s,
            probe_seconds=probe_s,
            info=info,
            rows=rows,
            summary=summarize(name, rows),
            meta=meta,
        )
        best = raw[name]["summary"]["all"]["best"]
        print(
            f"{name}: fit {fit_s:.0f} s, probe {probe_s:.0f} s, best {best['features']} {best['accuracy']:.4f}",
            flush=True,
        )
        if not args.no_write:
            raw_path.write_text(json.dumps(raw, indent=2) + "\n")
    order = [n for n in TARGETS if n in raw]
    text = results_path.read_text() if results_path.exists() else ""
    body = section({n: raw[n] for n in order}, meta_info(args.threads), current_notes(text, "Quality"))
    if args.no_write:
        print(body)
        return
    results_path.write_text(replace_section(text, "Quality", body))
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
