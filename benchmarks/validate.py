"""Choosing settings on a validation split held out from the train split: the only place they are chosen.

    .venv/bin/python benchmarks/validate.py cifar10 benchmarks/candidates/cifar10.json \
        [--data-dir ../shared/datasets] [--val 10000] [--split tail] [--threads 2] [--only NAME,...] [--random]
        [--save-runs DIR]

For each candidate (a JSON list of {"name", "fit": ConvAutoencoder parameters, "probe": run_probe
options}, or "probes": a list of named run_probe options, each probing the one trained model), the autoencoder trains on the train split less its last `--val` images (no labels),
and the probe fits on those images' features (and their mirrors, when the candidate's probe says
augment "flip") and scores the last `--val` train images: the official test split is never read.
With --random, the same architecture with random weights (data statistics measured, no training)
is probed alike. Every row goes to benchmarks/validation.jsonl as it is measured (a rerun skips the
probes already there; a candidate with a new probe retrains for it), with the training seconds,
the probe's seconds and the peak memory of this process; the table of the file's rows is printed
as Markdown.

A probe whose "max_iter" is a list (e.g. [150, 200, 300]) extracts its features once and fits
the classifiers once per value: rows "candidate:probe@150" ..., each with the extraction's
seconds plus its own fit's as its probe seconds (so L-BFGS's iteration cap is chosen here too);
"precondition": [false, true] and "c_scale": [2, 4] likewise (rows "...@300",
"...@300+precondition", "...@300+c2"), several lists giving every combination. Such a probe
fits the trained model's features only (--random does not apply to it).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets"
RESULTS = HERE / "validation.jsonl"


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def run_candidate(dataset: str, cand: dict, train, val, random_baseline: bool, threads: int,
                  skip: frozenset[str] = frozenset(), save_to: Path | None = None,
                  reuse: bool = False) -> list[dict]:  # fmt: skip
    """Train the candidate once (saved as a run directory in `save_to`, if given; with `reuse`,
    loaded from there if an earlier run saved it) and run each of its probes not named in `skip`."""
    import torch

    import convae

    if threads:
        torch.set_num_threads(threads)
    saved = None if save_to is None else save_to / f"{dataset}-{cand['name']}"
    if reuse and saved is not None and (saved / "model.safetensors").is_file():
        est = convae.ConvAutoencoder.load(saved)  # trained by an earlier run of this script
        seconds = saved / "train_seconds.json"
        train_seconds = json.loads(seconds.read_text())["train_seconds"] if seconds.is_file() else float("nan")
    else:
        t0 = time.perf_counter()
        est = convae.ConvAutoencoder(**{"device": "cpu", **cand["fit"]}).fit(train.images)
        train_seconds = time.perf_counter() - t0
        if saved is not None:
            est.save(saved)
            (saved / "train_seconds.json").write_text(json.dumps({"train_seconds": train_seconds}))
    out = []
    for name, options in _probes(cand):
        probe = {"classifiers": "logreg", **options, "baselines": "random" if random_baseline else "none"}
        for row_name, row_options, probe_seconds, rows in _measured(est, train, val, name, options, probe, skip):
            common = dict(dataset=dataset, candidate=row_name, fit=cand["fit"], probe=row_options,
                          train_seconds=round(train_seconds, 1), probe_seconds=round(probe_seconds, 1),
                          epochs=len(est.history_), images_seen=sum(int(h.get("images", 0)) for h in est.history_),
                          peak_gb=round(_peak_gb(), 2))  # fmt: skip
            out.extend(dict(common, **row) for row in rows)
    return out


def _measured(est, train, val, name: str, options: dict, probe: dict, skip: frozenset[str]):
    """(row name, its options as the candidate gives them, seconds, rows) of one probe (`probe`:
    the run_probe options), or of each combination of its swept values (:func:`_sweep`)."""
    import convae
    from convae.probe import evaluate_feature_sets

    sweep = _sweep(name, probe)
    if sweep is None:
        if name not in skip:
            t0 = time.perf_counter()
            rows = convae.run_probe(est, train, val, device="cpu", **probe)
            yield name, options, time.perf_counter() - t0, rows
        return
    todo = [(row, values) for row, values in sweep if row not in skip]
    if not todo:
        return
    t0 = time.perf_counter()
    sets, parsed = _feature_sets(est, train, val, probe)
    extraction = time.perf_counter() - t0
    for row, values in todo:
        t0 = time.perf_counter()
        rows = evaluate_feature_sets(sets, train.labels, val.labels, parsed.replace(**values))
        yield row, {**options, **values}, extraction + time.perf_counter() - t0, rows


def _sweep(name: str, probe: dict) -> list[tuple[str, dict]] | None:
    """(row name, values) for each combination of a probe's listed max_iter, precondition and
    c_scale values ("name@300", "name@300+precondition+c2"), or None if it lists none of them."""
    iters, pre, scales = probe.get("max_iter"), probe.get("precondition"), probe.get("c_scale")
    if not any(isinstance(v, list) for v in (iters, pre, scales)):
        return None
    iters = iters if isinstance(iters, list) else [iters]
    pre = pre if isinstance(pre, list) else [bool(pre)]
    c_list = scales if isinstance(scales, list) else [scales]
    rows = []
    for c in c_list:
        for m in iters:
            for p in pre:
                row = name + (f"@{m}" if m is not None else "") + ("+precondition" if p else "")
                row += f"+c{c:g}" if isinstance(scales, list) else ""
                rows.append((row, {"max_iter": m, "precondition": p, **({"c_scale": c} if c is not None else {})}))
    return rows


def _feature_sets(est, train, val, probe: dict):
    """The probe's feature sets of the train and validation images, extracted once, as
    ``convae.run_probe`` builds them, with the options they were extracted under."""
    from convae.probe import ProbeOptions, probe_feature_sets

    options = ProbeOptions(**{**probe, "max_iter": None, "precondition": False, "c_scale": 1.0})
    return probe_feature_sets(est, train, val, options, device="cpu"), options


def _probes(cand: dict) -> list[tuple[str, dict]]:
    """(row name, run_probe options) of each probe of a candidate's one trained model: its "probe",
    or each of its "probes" ({"name": ..., options}: named "candidate:name")."""
    if "probes" not in cand:
        return [(cand["name"], cand.get("probe", {}))]
    return [(f"{cand['name']}:{p['name']}", {k: v for k, v in p.items() if k != "name"}) for p in cand["probes"]]


def _row_names(name: str, options: dict) -> list[str]:
    sweep = _sweep(name, options)
    return [name] if sweep is None else [row for row, _ in sweep]


def split(dataset: str, data_dir: Path, n_val: int, how: str = "tail"):
    """(train less n_val images, those n_val images), both labelled: the last n_val ("tail"), or a
    stratified draw of n_val, seeded ("stratified": a folder of class subfolders lists its images
    class by class, so its tail would be one or two classes)."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    import convae

    train = convae.load_dataset(dataset, "train", data_dir=data_dir, download=False)
    cut = len(train) - n_val
    if how == "tail":
        return train.subset(np.arange(cut)), train.subset(np.arange(cut, len(train)))
    fit_idx, val_idx = train_test_split(np.arange(len(train)), test_size=n_val, stratify=train.labels, random_state=0)
    return train.subset(np.sort(fit_idx)), train.subset(np.sort(val_idx))


def table(rows: list[dict]) -> str:
    head = "| candidate | features | augment | dim | val accuracy | train s | probe s | peak GB |\n|---|---|---|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['candidate']} | {r['features']} | {r.get('augment', 'none')} | {r['dim']} | {r['accuracy']:.4f} | "
            f"{r['train_seconds']:.0f} | {r['probe_seconds']:.0f} | {r['peak_gb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("candidates", type=Path)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--val", type=int, default=10_000, help="train images held out for scoring (--split says which)")
    ap.add_argument(
        "--split",
        choices=("tail", "stratified"),
        default="tail",
        help="hold out the last --val train images (the built-in datasets), or a seeded stratified draw (folders)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", help="candidate names, comma-separated")
    ap.add_argument("--random", action="store_true", help="also probe the same architecture with random weights")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument(
        "--save-runs",
        type=Path,
        help="save each trained model as a run directory DIR/DATASET-CANDIDATE (for benchmarks that read its features)",
    )
    ap.add_argument(
        "--reuse-runs",
        action="store_true",
        help="with --save-runs: a candidate saved there by an earlier run is loaded, not trained again "
        "(its rows keep that run's training seconds)",
    )
    args = ap.parse_args(argv)
    candidates = json.loads(args.candidates.read_text())
    if args.only:
        wanted = set(args.only.split(","))
        candidates = [c for c in candidates if c["name"] in wanted]
    done = set()
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["candidate"]))
    train, val = split(args.dataset, args.data_dir, args.val, args.split)
    for cand in candidates:
        # A candidate retrains only for probes it has no rows for (a probe added later).
        names = [row for name, options in _probes(cand) for row in _row_names(name, options)]
        skip = frozenset(name for name in names if (args.dataset, name) in done)
        if len(skip) == len(names):
            continue
        rows = run_candidate(
            args.dataset, cand, train, val, args.random, args.threads, skip, args.save_runs, args.reuse_runs
        )
        with open(args.results, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(table(rows), flush=True)
    all_rows = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    print(table([r for r in all_rows if r["dataset"] == args.dataset]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
