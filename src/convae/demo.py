"""The whole pipeline on the built-in `digits` data: what `make demo` runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import load_dataset
from .errors import RunDirError
from .estimator import ConvAutoencoder
from .outputs import OutputError, check_outputs, is_run_dir, lock_output, run_file_of
from .probe import run_probe, write_results
from .readback import quoted
from .report import write_report
from .run import load_config, remove_run
from .train import evaluate
from .views import reconstruction_figure, save_figure

DEMO_SETTINGS = dict(epochs=20, batch_size=64, lr=3e-3, seed=0)
# Logistic regression on every stage and the bottleneck, with 10 labels per class and with all.
DEMO_PROBE = dict(pool="grid4", classifiers="logreg", labels_per_class="10,all", seeds=3)


@dataclass
class DemoResult:
    out_dir: Path
    run_dir: Path
    model_rows: list[dict]
    history: list[dict]
    test_metrics: dict[str, float]
    outputs: dict[str, Path] = field(default_factory=dict)
    probe_rows: list[dict] = field(default_factory=list)  # `convae probe` on digits, baselines included


def run_demo(out_dir: str | Path = "demo-output", *, progress: bool = False) -> DemoResult:
    """Train on digits:train; reconstruct, probe and report on digits:test. Replaces the previous demo run.

    Only the demo's own files are replaced: the run's files in ``OUT/digits-run`` and the outputs
    beside it; anything else a user keeps in those folders stays. A second demo writing into
    the same folder is refused (:func:`convae.outputs.lock_output`).
    """
    out_dir = Path(out_dir)
    if is_run_dir(out_dir) or run_file_of(out_dir / "x"):  # its files would go among a run's own
        raise OutputError(f"--out {quoted(out_dir)}: is (inside) a convae run; choose a folder of its own for the demo")
    with lock_output(out_dir, "--out"):
        return _run_demo(out_dir, progress)


def _run_demo(out_dir: Path, progress: bool) -> DemoResult:
    run_dir = out_dir / "digits-run"
    outputs = [out_dir / name for name in ("reconstructions.png", "probe.json", "probe.md", "report.html")]
    check_outputs(outputs, option="--out")  # not a folder, not a run's file
    if is_run_dir(run_dir):
        if load_config(run_dir).data.spec != "digits":
            raise RunDirError(f"{run_dir}: a run on other data, not the demo's; choose another --out")
        remove_run(run_dir)  # the demo's own run from an earlier `make demo`; the user's files stay
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    # force: digits-run may hold the user's files beside the run (kept; a run file of theirs is refused)
    est = ConvAutoencoder(verbose=progress, **DEMO_SETTINGS).fit(
        train.images, run_dir=run_dir, data_spec="digits", force=True
    )

    metrics = evaluate(est.model_, test.images, np.arange(len(test)), est._device(), channels_last=False)
    recon_path = save_figure(
        reconstruction_figure(test.images[:16], est.reconstruct(test.images[:16]), "digits:test"),
        out_dir / "reconstructions.png",
    )
    probe_rows = run_probe(est, train, test, **DEMO_PROBE)
    probe_path, _ = write_results(
        probe_rows, out_dir / "probe.json", run=str(run_dir), train=train.name, test=test.name
    )
    report = write_report(run_dir, test, out_dir / "report.html", probe=probe_path, progress=progress)
    return DemoResult(
        out_dir=out_dir,
        run_dir=run_dir,
        model_rows=est.model_.describe(),
        history=est.history_,
        test_metrics=metrics,
        outputs={
            "run directory": run_dir,
            "reconstructions": recon_path,
            "probe results": probe_path,
            "report": report.path,
        },
        probe_rows=probe_rows,
    )
