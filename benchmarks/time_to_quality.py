"""Time to quality (issue #5): default `convae fit mnist --max-time 60`, then `convae probe` (logreg,
official test split, --baselines none); target: accuracy >= 0.99 in under 150 s of wall clock for
the two commands together. A second, untimed probe with --baselines random compares random weights.

    .venv/bin/python benchmarks/time_to_quality.py [--data-dir ../shared/datasets] [--no-random]

Appends nothing: it (re)writes the "## Time to quality" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import CONVAE, DEFAULT_DATA, replace_section  # noqa: E402


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--no-random", action="store_true", help="Skip the untimed probe with random weights.")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "probe.json"
        fit = [CONVAE, "fit", "mnist", "--out", str(run), "--max-time", "60", "--data-dir", str(args.data_dir), "-q"]
        probe = [CONVAE, "probe", str(run), "--train", "mnist:train", "--test", "mnist:test", "--baselines", "none",
                 "--data-dir", str(args.data_dir), "-o", str(out), "-q"]
        fit_s = timed(fit)
        probe_s = timed(probe)
        rows = json.loads(out.read_text())["rows"]
        best = max(rows, key=lambda r: r["accuracy"])
        random_rows = []
        if not args.no_random:
            (HERE / "time_to_quality.json").write_text(json.dumps(dict(fit_s=fit_s, probe_s=probe_s, rows=rows)) + "\n")
            random_probe = [a if a != "none" else "random" for a in probe]  # --baselines random
            subprocess.run(random_probe, check=True, stdout=subprocess.DEVNULL)
            random_rows = [r for r in json.loads(out.read_text())["rows"] if r["features"].startswith("random/")]
    total = fit_s + probe_s
    met = best["accuracy"] >= 0.99 and total < 150
    lines = [
        "## Time to quality", "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {os.cpu_count()} CPU cores shared "
        "with other jobs (noisy). Target (issue #5): `convae fit mnist --max-time 60` with default settings, then "
        "`convae probe` (logreg, official test split, `--baselines none`), >= 0.99 in < 150 s for both.", "",
        "| step | wall (s) |", "|---|---:|", f"| fit | {fit_s:.0f} |", f"| probe | {probe_s:.0f} |", f"| total | {total:.0f} |", "",
        "| features | dim | accuracy | random weights |", "|---|---:|---:|---:|",
    ]
    rnd = {r["features"].removeprefix("random/"): r["accuracy"] for r in random_rows}
    for r in rows:
        lines.append(f"| {r['features']} | {r['dim']} | {r['accuracy']:.4f} | {rnd.get(r['features'], float('nan')):.4f} |")
    lines += ["", f"Best: {best['features']} {best['accuracy']:.4f} in {total:.0f} s: target "
              f"{'met' if met else 'NOT met'}.", "", "```", " ".join([Path(fit[0]).name, *fit[1:]]).replace(str(run), "RUN"),
              " ".join([Path(probe[0]).name, *probe[1:]]).replace(str(run), "RUN").replace(str(out), "probe.json"), "```", ""]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        path = HERE / "RESULTS.md"
        path.write_text(replace_section(path.read_text() if path.exists() else "", "Time to quality", body))


if __name__ == "__main__":
    main()
