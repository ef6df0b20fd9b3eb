"""Quality benchmark: every row of the README's quality table, from the presets, as a user runs them.

    .venv/bin/python benchmarks/quality.py [--data-dir ../shared/datasets] [--datasets digits,mnist,...]
        [--threads 2] [--runs benchmarks/runs] [--reuse-runs] [--no-write] [--from-json]

For each dataset (its preset; cifar10-patch is the single-layer reference row):

1. `convae fit DATA --preset NAME` in a subprocess: wall time and peak memory (its own rusage);
2. `convae probe RUN --preset NAME --baselines none`: the probe a user runs, timed, with its peak
   memory (the budgets: 20 minutes, 8 GB on CIFAR-10) and its test accuracy (the headline: the
   preset's train-time flips if it has them, never test-time ones);
3. `convae probe RUN --preset NAME --layers <every depth> --baselines random,pixels,pca
   --labels-per-class 10,100,all`, with test-time flips where the preset flips, which also scores
   the test images alone from the same fit: the trained, random-weight, pixel and PCA columns,
   few labels, the trained-minus-random margin per depth, and what test-time flips would add.

`--seeds 1,2` trains and probes the preset again with each training seed (steps 1 and 2, in
runs/PRESET-seedN): the table's run-to-run spread of the headline, mean ± std over seed 0 (the
preset's run) and these. With --reuse-runs, seeds already measured are kept.

`--headline-only` (with --reuse-runs) re-times step 2 alone, the probe a user runs, after a
change that should move its speed and not its accuracy; the comparison rows of the entry
before are kept (its "headline_meta" says when the headline was measured, "meta" when the rest).

Writes the "## Quality" section of benchmarks/RESULTS.md (its hand-written notes, from the line
starting "Notes (", are kept; a section with other blocks written by hand is never rewritten: the
script stops after quality.json, and --json-only prints the section to paste) and the raw rows to
benchmarks/quality.json, each file replaced whole (written beside it, then renamed). Every setting was
chosen on a validation split (benchmarks/validate.py); the test split is read here, once per
configuration reported.
"""

from __future__ import annotations

import argparse
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

from convae._io import atomic_write_text

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets"
CONVAE = shutil.which("convae", path=str(Path(sys.executable).parent)) or "convae"

# preset -> (dataset, test-accuracy target with all labels, reference results)
TARGETS = {
    "digits": ("digits", 0.98, "BernoulliRBM + logreg ≈ 0.93 (scikit-learn example)"),
    "mnist": ("mnist", 0.995, "conv WTA autoencoder + linear SVM 0.9952 (Makhzani & Frey 2015); pixels ≈ 0.92"),
    "mnist-convae": ("mnist", 0.995, "the ConvAE; measured when it was the mnist preset"),
    "fashion-mnist": ("fashion-mnist", 0.93, "pixels + logreg ≈ 0.845; RBF SVM on pixels 0.897"),
    "fashion-mnist-convae": ("fashion-mnist", 0.93, "the ConvAE; measured when it was the fashion-mnist preset"),
    "cifar10": ("cifar10", 0.82, "multi-layer unsupervised features + linear classifier 0.820 (Coates & Ng 2011)"),
    "cifar10-patch": ("cifar10", 0.80, "k-means single layer + linear SVM 0.796 (Coates et al. 2011)"),
    "cifar10-deep": ("cifar10", 0.82, "the ConvAE hierarchy; measured when it was the cifar10 preset"),
}
NOTES_START = "Notes ("


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; (wall seconds, its peak resident memory in GB, from its own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1e6  # kB on Linux


def fit(preset: str, data_dir: Path, runs: Path, threads: int, seed: int | None = None) -> tuple[Path, dict]:
    """`convae fit` with the preset; `seed` None: the preset's (the CLI's default, 0), in runs/PRESET;
    else that training seed, in runs/PRESET-seedN."""
    dataset = TARGETS[preset][0]
    run = runs / (preset if seed is None else f"{preset}-seed{seed}")
    if run.exists():
        shutil.rmtree(run)
    cmd = [CONVAE, "fit", dataset, "--preset", preset, "--out", str(run), "--data-dir", str(data_dir), "--quiet"]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--seed", str(seed)] if seed is not None else []
    seconds, peak = timed(cmd)
    return run, dict(command=cmd, fit_seconds=round(seconds, 1), fit_peak_gb=round(peak, 2))


def probe_command(preset: str, run: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    dataset = TARGETS[preset][0]
    return [CONVAE, "probe", str(run), "--train", f"{dataset}:train", "--test", f"{dataset}:test", "--preset",
            preset, "--data-dir", str(data_dir), "-o", str(out), "--quiet", "--device", "cpu", *extra]  # fmt: skip


def headline(preset: str, run: Path, data_dir: Path) -> dict:
    """The probe a user runs: the preset's, no baselines."""
    out = run.parent / f"{run.name}-headline.json"
    seconds, peak = timed(probe_command(preset, run, data_dir, out, "--baselines", "none"))
    rows = json.loads(out.read_text())["rows"]
    best = max(rows, key=lambda r: r["accuracy"])
    return dict(probe_seconds=round(seconds, 1), probe_peak_gb=round(peak, 2), headline=best)


def comparison(preset: str, run: Path, data_dir: Path, baselines: str, labels: str) -> list[dict]:
    """Every depth's feature sets beside the baselines (random weights, pixels, PCA), with few labels too."""
    import convae

    recommended = convae.presets.get_preset(preset).probe
    model, _ = convae.load_model(run)
    layers = list(dict.fromkeys([*recommended["layers"].split(","), *depth_sets(model)]))
    augment = "flip-tta" if recommended.get("augment", "none") != "none" else "none"
    out = run.parent / f"{preset}-comparison.json"
    extra = ["--layers", ",".join(layers), "--baselines", baselines, "--labels-per-class", labels,
             "--augment", augment]  # fmt: skip
    timed(probe_command(preset, run, data_dir, out, *extra))
    return json.loads(out.read_text())["rows"]


def other_seeds(preset: str, args, earlier: list[dict]) -> list[dict]:
    """The run-to-run spread: each seed of --seeds trained and probed as the headline is (fit, then
    the preset's probe, each timed), one row a seed; with --reuse-runs a seed already measured
    (its run kept, its row in `earlier`) is kept as it was."""
    done = {row["seed"]: row for row in earlier}
    rows = []
    for seed in args.seeds:
        run = args.runs / f"{preset}-seed{seed}"
        if args.reuse_runs and seed in done and (run / "model.safetensors").exists():
            rows.append(done[seed])
            continue
        run, info = fit(preset, args.data_dir, args.runs, args.threads, seed)
        info.update(headline(preset, run, args.data_dir))
        best = info.pop("headline")
        rows.append(dict(seed=seed, **info, features=best["features"], accuracy=best["accuracy"]))
    return rows


def spread(res: dict) -> str:
    """The headline's mean ± std (ddof 1) over the preset's seed and --seeds, or "–" with one seed."""
    accuracies = [res["headline"]["accuracy"], *(row["accuracy"] for row in res.get("seeds", []))]
    if len(accuracies) < 2:
        return "–"
    mean = sum(accuracies) / len(accuracies)
    std = (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5
    return f"{mean:.4f} ± {std:.4f} ({len(accuracies)})"


def depth_sets(model) -> list[str]:
    """One feature set per depth: the hierarchy's layers up to it, joined (stage1, stage1+stage2, ...)."""
    hierarchy = model.hierarchy_layers()
    return ["+".join(hierarchy[: i + 1]) for i in range(len(hierarchy))]


def summarize(rows: list[dict], model, preset_augment: str) -> dict:
    """Per labels per class: the best trained set (headline augment), random, pixels, PCA; margins by depth."""
    import convae

    plain = "flip" if preset_augment != "none" else "none"
    out = {}
    for k in dict.fromkeys(str(r["labels_per_class"]) for r in rows):
        sub = [r for r in rows if str(r["labels_per_class"]) == k]
        entry = {name: _pick(sub, source, plain) for name, source in SOURCES}
        if plain != "none":
            entry["best_tta"] = _pick(sub, "", "flip-tta")
        depth = convae.views.depth_rows([r for r in sub if r["augment"] == plain], model)
        entry["depth"] = [dict(depth=e["depth"], margin=e.get("margin"), trained=e.get("trained")) for e in depth]
        out[k] = entry
    return out


SOURCES = (("best", ""), ("random", "random"), ("pixels", "pixels"), ("pca", "pca"))


def _pick(rows: list[dict], source: str, augment: str) -> dict | None:
    return _best([r for r in rows if _source(r) == source and r["augment"] == augment])


def _source(row: dict) -> str:
    name = row["features"]
    if name in ("pixels", "pca"):
        return name
    return "random" if name.startswith("random/") else "" if name.count("/") == 1 else "other"


def _best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["accuracy"]) if rows else None


def fmt(r) -> str:
    return "–" if r is None else f"{r['accuracy']:.4f}"


def table(results: dict) -> list[str]:
    lines = [
        "| preset | train s (GB) | probe s (GB) | best trained set (dim) | accuracy | training seeds: mean ± std (n) | with test-time flips | random weights | pixels | PCA | trained - random by depth | 100/class: trained / random / PCA | 10/class: trained / random / PCA | target | met |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---|---|---|---:|---|",
    ]  # fmt: skip
    for preset, res in results.items():
        s, target = res["summary"], TARGETS[preset][1]
        a = s["all"]
        low = [
            f"{fmt(s[k]['best'])} / {fmt(s[k]['random'])} / {fmt(s[k]['pca'])}" if k in s else "–"
            for k in ("100", "10")
        ]
        depth = ", ".join(f"{e['depth']}: {e['margin'] * 100:+.1f}" for e in a["depth"] if e["margin"] is not None)
        best = a["best"]
        lines.append(
            f"| `{preset}` | {res['fit_seconds']:.0f} ({res['fit_peak_gb']:.1f}) | {res['probe_seconds']:.0f} "
            f"({res['probe_peak_gb']:.1f}) | {best['features']} ({best['dim']}) | {fmt(best)} | {spread(res)} | "
            f"{fmt(a.get('best_tta'))} | "
            f"{fmt(a['random'])} | {fmt(a['pixels'])} | {fmt(a['pca'])} | {depth or '–'} | {low[0]} | {low[1]} | "
            f"{target} | {'yes' if best['accuracy'] >= target else 'no'} |"
        )
    return lines


def section(results: dict, meta: dict, notes: str) -> str:
    lines = [
        "## Quality",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPU cores), Python {meta['python']}, torch "
        f"{meta['torch']}, scikit-learn {meta['sklearn']}, convae {meta['convae']}, {meta['threads']} torch threads; "
        "`benchmarks/quality.py`, which writes this section.",
        "",
        "Each preset trained by `convae fit DATA --preset NAME` and probed by `convae probe RUN --preset NAME` "
        "(logistic regression on frozen features, the official test splits; digits: the fixed 80/20 split): "
        "train s and probe s are their wall times, GB their peak resident memory. `accuracy` scores the test "
        "images alone (train-time flips where the preset has them); `with test-time flips` is the same "
        "classifier scoring each test image with its mirror image, never the headline. Random weights: the same "
        "architecture untrained, its data statistics measured (batch norm, whitening, PCA), best set; PCA of "
        "the pixels with the best set's dimension (capped below the pixel count); training seeds: the "
        "headline's mean ± sample std over training seeds (`--seeds`), each trained and probed as above; by depth: the best set "
        "reaching each depth, trained minus random, in points; 10 and 100 labels per class: mean of 3 label "
        "subsets.",
        "",
        *table(results),
        "",
        "Reference results: " + "; ".join(f"{p}: {TARGETS[p][2]}" for p in results),
        "",
        notes,
        "",
    ]
    return "\n".join(lines)


def current_notes(text: str, title: str) -> str:
    """The hand-written notes of the `## title` section of `text` (from NOTES_START to the next `## `)."""
    m = re.search(rf"^## {re.escape(title)}\n.*?^({re.escape(NOTES_START)}.*?)(?=^## |\Z)", text, re.S | re.M)
    return m.group(1).rstrip("\n") if m else ""


def _section(title: str) -> re.Pattern:
    """The `## title` section of a results file, up to the next `## `; group 1 its body."""
    return re.compile(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", re.S | re.M)


def hand_written_blocks(text: str, title: str) -> bool:
    """Whether the `## title` section holds more than this script writes: anything before its notes
    that does not begin with the generated "Measured ..." paragraph (whole blocks written by hand,
    which replace_section would drop)."""
    m = _section(title).search(text)
    if not m:
        return False
    generated = m.group(1).split(NOTES_START, 1)[0].strip()
    return bool(generated) and not generated.startswith("Measured ")


def replace_section(text: str, title: str, body: str) -> str:
    """`text` with its `## title` section (up to the next `## `) replaced by `body`, or `body` appended."""
    pattern = _section(title)
    if pattern.search(text):
        return pattern.sub(lambda m: body.rstrip("\n") + "\n\n", text, count=1)
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


def measure(preset: str, args, raw: dict) -> dict:
    import convae

    reuse = args.reuse_runs and (args.runs / preset / "model.safetensors").exists() and preset in raw
    run, info = (args.runs / preset, {k: raw[preset][k] for k in ("command", "fit_seconds", "fit_peak_gb")}) if reuse \
        else fit(preset, args.data_dir, args.runs, args.threads)  # fmt: skip
    if args.headline_only and not (reuse and "rows" in raw.get(preset, {})):
        raise SystemExit(f"--headline-only: {preset} needs a run in {args.runs} and its entry in quality.json")
    info.update(headline(preset, run, args.data_dir))
    earlier_seeds = raw[preset].get("seeds", []) if reuse else []
    if args.seeds or earlier_seeds:
        info["seeds"] = other_seeds(preset, args, earlier_seeds) if args.seeds else earlier_seeds
    if args.headline_only:
        return dict(raw[preset], **info, headline_meta=meta_info(args.threads))
    rows = comparison(preset, run, args.data_dir, args.baselines, args.labels)
    model, _ = convae.load_model(run)
    augment = convae.presets.get_preset(preset).probe.get("augment", "none")
    return dict(info, rows=rows, summary=summarize(rows, model, augment), meta=meta_info(args.threads))


def _seeds(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if any(seed <= 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError("distinct seeds above 0 (the preset's own run is seed 0)")
    return seeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--datasets", default=",".join(TARGETS), help="presets, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--reuse-runs", action="store_true", help="probe the runs already in --runs again")
    p.add_argument("--headline-only", action="store_true", help="re-time the preset's probe alone (--reuse-runs)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    p.add_argument("--baselines", default="random,pixels,pca", help="the comparison's baselines (fewer: faster)")
    p.add_argument("--labels", default="10,100,all", help="the comparison's labels per class")
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=[],
        help="more training seeds, e.g. 1,2: each fitted and "
        "probed like the headline, for the run-to-run spread (the preset's own run is seed 0)",
    )
    p.add_argument("--json-only", action="store_true", help="write quality.json, print the section (a partial run)")
    p.add_argument("--from-json", action="store_true", help="rewrite the section from quality.json; run nothing")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results_path, raw_path = HERE / "RESULTS.md", HERE / "quality.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    for preset in [] if args.from_json else filter(None, args.datasets.split(",")):
        raw[preset] = measure(preset, args, raw)
        # what this run measured: the headline alone, or the comparison's best set
        best = raw[preset]["headline"] if args.headline_only else raw[preset]["summary"]["all"]["best"]
        print(f"{preset}: {best['features']} {best['accuracy']:.4f}", flush=True)
        if not args.headline_only:  # the comparison kept is the earlier run's
            raw[preset]["comparison"] = dict(baselines=args.baselines, labels=args.labels)
        if not args.no_write:
            atomic_write_text(raw_path, json.dumps(raw, indent=2) + "\n")
    order = [n for n in TARGETS if n in raw and "summary" in raw[n] and "depth" in raw[n]["summary"]["all"]]
    text = results_path.read_text() if results_path.exists() else "# convae benchmarks\n"
    body = section({n: raw[n] for n in order}, meta_info(args.threads), current_notes(text, "Quality"))
    if args.no_write or args.json_only:
        print(body)
        return
    if hand_written_blocks(text, "Quality"):
        sys.exit(
            f"{results_path}: not rewritten: its Quality section has blocks written by hand, which rewriting "
            "would drop (quality.json holds every row measured); --json-only prints the section to edit in by hand"
        )
    atomic_write_text(results_path, replace_section(text, "Quality", body))
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
