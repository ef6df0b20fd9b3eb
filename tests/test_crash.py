"""Crash safety: real kills of `convae fit`, Ctrl-C and SIGTERM, full disks, NaN losses.

Kill points of `convae fit`, each followed by a run that must finish with exactly the weights
of a run never interrupted (deterministic CPU run, see tests/killing.py for the machinery):

* SIGKILL right after start, before any checkpoint (config.json only) -> `--resume` starts over;
* SIGKILL inside the atomic write of model.safetensors (temporary file written, not renamed);
* SIGKILL inside the atomic write of checkpoint/last.pt (likewise);
* Ctrl-C (SIGINT) inside an epoch -> mid-epoch checkpoint, exit 130, one line;
* SIGTERM inside an epoch (job schedulers send it before SIGKILL) -> the same, exit 143;
* SIGKILL at a random moment inside an epoch (tests/test_cli.py) and of a whole torchrun
  process group (tests/test_distributed.py); `convae extract` killed: tests/test_features.py.

The same points are checked in-process (deterministic, fast): mid-epoch checkpoints resume
exactly, a crash at any step loses nothing written, a full disk (simulated, and a real tmpfs)
is one clear line that keeps the previous checkpoint, and NaN losses follow --on-nan.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from sklearn.datasets import load_digits

import convae._io as cio
import convae.train as T
import convae.train.hooks as hooks
import convae.train.loop as loop
from convae import run as rundir
from convae.cli import main
from convae.config import TrainConfig
from convae.errors import RunDirError, StorageError
from convae.models import default_model_config
from convae.train import TrainingError, TrainingInterrupted, fit
from killing import exists, history_rows, kill_when, run, temp_files

ARGS = [
    "fit",
    "digits",
    "--epochs",
    6,
    "--batch-size",
    32,
    "--threads",
    1,
    "--seed",
    4,
    "--widths",
    "32,64",
    "--convs-per-stage",
    2,
    "--noise",
    0.1,
    "--mask-ratio",
    0.25,
    "--device",
    "cpu",
    "-q",
]  # epochs of ~0.7 s: a signal sent 0.15 s into one lands inside it


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted run, through the same CLI in this process (saves a process start)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    showwarning = warnings.showwarning
    try:
        result = CliRunner().invoke(main, [*map(str, ARGS), "--out", str(out)])
    finally:
        warnings.showwarning = showwarning  # main() replaces it
    assert result.exit_code == 0, result.output
    return out


def test_fit_survives_a_chain_of_real_kills(whole, tmp_path):
    """Six processes, five killed at different points, end with the uninterrupted run's weights."""
    cut = tmp_path / "cut"
    ckpt = cut / "checkpoint" / "last.pt"

    # 1. SIGKILL right after start: config.json written, no checkpoint yet.
    o = kill_when([*ARGS, "--out", cut], exists(cut / "config.json"))
    assert o.killed and o.returncode == -signal.SIGKILL
    assert not ckpt.exists()

    # 2. --resume with no checkpoint starts over (a warning, not an error); SIGKILL while the
    #    second epoch's model.safetensors is written but not yet renamed into place.
    o = kill_when([*ARGS, "--out", cut, "--resume"], lambda: True, pause_replace="*/model.safetensors", pause_at=2)
    assert o.paused and o.killed, o.stderr
    assert "no checkpoint yet" in o.stderr
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert [p.name for p in temp_files(cut)][0].startswith(".model.safetensors.")
    rundir.load_model(cut)  # the file in place is the whole epoch-1 model

    # 3. SIGKILL inside the checkpoint write of epoch 3 (this process rewrites epoch 2, then 3).
    o = kill_when([*ARGS, "--out", cut, "--resume"], lambda: True, pause_replace="*/checkpoint/last.pt", pause_at=2)
    assert o.paused and o.killed, o.stderr
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2  # the previous checkpoint, whole
    assert any(p.name.startswith(".last.pt.") for p in temp_files(cut))

    # 4. Ctrl-C inside epoch 5: a checkpoint at the next step boundary, one line, exit 130.
    o = kill_when([*ARGS, "--out", cut, "--resume"], history_rows(cut, 4), sig=signal.SIGINT, delay=0.15)
    assert o.killed and o.returncode == 130, o.stderr
    assert one_line(o.stderr).startswith("convae: interrupted; saved a checkpoint at ")
    assert "--resume" in o.stderr
    assert not temp_files(cut)  # the resumed run cleared the killed runs' temporary files

    # 5. SIGTERM (what a scheduler sends before SIGKILL) inside epoch 6: the same, exit 143.
    o = kill_when([*ARGS, "--out", cut, "--resume"], history_rows(cut, 5), sig=signal.SIGTERM, delay=0.15)
    assert o.killed and o.returncode == 143, o.stderr
    assert one_line(o.stderr).startswith("convae: interrupted; saved a checkpoint at ")

    # 6. The last resume finishes with exactly the weights of the run never interrupted.
    run([*ARGS, "--out", cut, "--resume"])
    same_weights(whole, cut)
    assert rundir.read_history(cut)[-1]["train_loss"] == rundir.read_history(whole)[-1]["train_loss"]
    assert len(rundir.read_history(cut)) == 6
    assert not temp_files(cut)


# ---------------------------------------------------------------------------------------------
# in-process: the same guarantees, deterministic
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return (load_digits().images * 255 / 16).round().astype(np.uint8)[..., None][:300]


CFG = default_model_config((8, 8, 1), channels=(8, 16))
TRAIN = TrainConfig(epochs=3, batch_size=32, threads=1, device="cpu", seed=5, noise=0.1, mask_ratio=0.25)


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference(digits):
    return fit(digits, CFG, TRAIN)


def _at_step(monkeypatch, k: int, action) -> None:
    """Call `action()` when training draws the corruption of its k-th step (1-based)."""
    calls = [0]
    real = loop.corrupt

    def corrupt(x, config, generator):
        calls[0] += 1
        if calls[0] == k:
            action()
        return real(x, config, generator)

    monkeypatch.setattr(loop, "corrupt", corrupt)


def test_ctrl_c_mid_epoch_writes_a_checkpoint_that_resumes_exactly(digits, reference, tmp_path, monkeypatch):
    _at_step(monkeypatch, 13, lambda: os.kill(os.getpid(), signal.SIGINT))  # epoch 2 of 9 steps each
    with pytest.raises(TrainingInterrupted, match=r"epoch 2, step 13 .*--resume") as e:
        fit(digits, CFG, TRAIN, run_dir=tmp_path)
    assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    state = rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT_FILE)
    assert state["epoch"] == 1 and state["step"] == 13 and state["position"]["batches"] == 4
    monkeypatch.undo()
    resumed = fit(digits, CFG, TRAIN, run_dir=tmp_path, resume=True)
    assert_same(reference.model, resumed.model)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in reference.history]


def test_a_crash_at_any_step_loses_no_more_than_the_checkpoint_interval(digits, reference, tmp_path, monkeypatch):
    """With mid-epoch checkpoints after every step, a crash anywhere resumes exactly."""
    monkeypatch.setattr(hooks, "CHECKPOINT_INTERVAL_S", 0.0)

    class Crash(Exception):
        pass

    def crash():
        raise Crash

    _at_step(monkeypatch, 16, crash)
    with pytest.raises(Crash):
        fit(digits, CFG, TRAIN, run_dir=tmp_path)
    state = rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT_FILE)
    assert state["step"] == 15 and state["position"]["batches"] == 6
    monkeypatch.undo()
    assert_same(reference.model, fit(digits, CFG, TRAIN, run_dir=tmp_path, resume=True).model)


def test_a_run_killed_before_its_first_checkpoint_can_be_rerun_or_resumed(digits, reference, tmp_path):
    rundir.save_config(tmp_path / "a", rundir.RunConfig(model=CFG, train=TRAIN))  # what a kill leaves
    assert_same(reference.model, fit(digits, CFG, TRAIN, run_dir=tmp_path / "a").model)  # plain rerun
    rundir.save_config(tmp_path / "b", rundir.RunConfig(model=CFG, train=TRAIN))
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        assert_same(reference.model, fit(digits, CFG, TRAIN, run_dir=tmp_path / "b", resume=True).model)
    # a run that finished an epoch is never overwritten; resuming a finished run changes nothing
    with pytest.raises(RunDirError, match="--resume"):
        fit(digits, CFG, TRAIN, run_dir=tmp_path / "a")
    files = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file() and p.name != "config.json"}
    again = fit(digits, CFG, TRAIN, run_dir=tmp_path / "a", resume=True)
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in reference.history]
    assert_same(reference.model, again.model)
    assert all(p.read_bytes() == data for p, data in files.items())


def test_leftover_temporary_files_are_ignored_then_removed(digits, tmp_path):
    fit(digits, CFG, TrainConfig(epochs=1, batch_size=64, threads=1, device="cpu"), run_dir=tmp_path)
    junk = [tmp_path / "checkpoint" / ".last.pt.abc123.tmp", tmp_path / ".model.safetensors.x.tmp"]
    for p in junk:
        p.write_bytes(b"half a file")
    keep = tmp_path / ".notes.tmp"  # not a file convae writes: untouched
    keep.write_text("mine")
    rundir.load_model(tmp_path)
    fit(digits, CFG, TrainConfig(epochs=2, batch_size=64, threads=1, device="cpu"), run_dir=tmp_path, resume=True)
    assert not any(p.exists() for p in junk) and keep.exists()


def test_two_processes_never_train_into_one_run_directory(digits, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    lock = cio.lock_dir(tmp_path)  # as another process training there would hold it
    try:
        with pytest.raises(RunDirError, match="another convae process"):
            fit(digits, CFG, TRAIN, run_dir=tmp_path)
    finally:
        lock.release()
    fit(digits, CFG, TrainConfig(epochs=1, threads=1, device="cpu"), run_dir=tmp_path)  # free again


def test_written_files_follow_the_umask_and_keep_a_mode_the_user_set(tmp_path):
    target = tmp_path / "notes.txt"
    old = os.umask(0o027)
    try:
        with cio.atomic_path(target) as tmp:
            tmp.write_text("first")
        assert target.stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0600
        target.chmod(0o604)
        with cio.atomic_path(target) as tmp:
            tmp.write_text("second")
        assert target.stat().st_mode & 0o777 == 0o604 and target.read_text() == "second"
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# full disks
# ---------------------------------------------------------------------------------------------
def _full_open(real_open, match: str):
    """open() whose files matching `match`, opened for writing, hit a full disk half-way."""

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])  # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f) if "w" in mode and match in str(path) else f

    return full_open


def test_a_full_disk_is_one_clear_line_and_keeps_the_previous_checkpoint(digits, tmp_path, monkeypatch):
    ckpt = tmp_path / rundir.CHECKPOINT_FILE
    before = []

    def disk_fills_after_epoch_1(row):
        if row["epoch"] == 1:
            before.append(ckpt.read_bytes())
            monkeypatch.setattr(cio, "open", _full_open(open, "last.pt"), raising=False)

    train = TrainConfig(epochs=2, batch_size=64, threads=1, device="cpu")
    with pytest.raises(StorageError) as e:
        fit(digits, CFG, train, run_dir=tmp_path, on_epoch=disk_fills_after_epoch_1)
    message = str(e.value)
    assert "\n" not in message and "no space left on device" in message and str(ckpt) in message
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert ckpt.read_bytes() == before[0] and not temp_files(tmp_path)
    monkeypatch.undo()
    assert len(fit(digits, CFG, train, run_dir=tmp_path, resume=True).history) == 2


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_really_full_disk(digits, small_disk, tmp_path, monkeypatch):
    """A real tmpfs that fills up during training, then a CLI resume on the full disk."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    run_dir = small_disk / "run"
    ckpt = run_dir / rundir.CHECKPOINT_FILE
    before, filler = [], []

    def disk_fills_after_epoch_1(row):
        if row["epoch"] == 1:
            before.append(ckpt.read_bytes())
            filler.append(_fill(small_disk))

    with pytest.raises(StorageError, match="no space left on device"):
        fit(
            digits,
            CFG,
            TrainConfig(epochs=2, batch_size=64, threads=1, device="cpu"),
            run_dir=run_dir,
            on_epoch=disk_fills_after_epoch_1,
        )
    assert ckpt.read_bytes() == before[0] and not temp_files(run_dir)
    rundir.load_model(run_dir)  # still the whole epoch-1 run

    np.save(tmp_path / "digits.npy", digits)
    args = ["fit", str(tmp_path / "digits.npy"), "--out", str(run_dir), "--threads", "1", "-q", "--resume"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert line.startswith("convae: error: cannot write ") and "no space left on device" in line
    assert ckpt.read_bytes() == before[0] and not temp_files(run_dir)
    filler[0].unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(rundir.read_history(run_dir)) == 2


# ---------------------------------------------------------------------------------------------
# NaN and infinite losses
# ---------------------------------------------------------------------------------------------
def _nan_at(monkeypatch, steps: set[int]) -> None:
    """The loss of the given (1-based, counted per fit call) steps becomes NaN."""
    calls = [0]
    real = loop.objective_loss

    def loss(objective, x_in, target, step):
        calls[0] += 1
        value = real(objective, x_in, target, step)
        return value * float("nan") if calls[0] in steps else value

    monkeypatch.setattr(loop, "objective_loss", loss)


def test_nan_stop_names_epoch_and_step_and_keeps_the_last_good_checkpoint(digits, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {14})
    with pytest.raises(TrainingError) as e:
        fit(digits, CFG, TRAIN, run_dir=tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert "loss became nan at epoch 2, step 14" in message and "checkpoint (epoch 1) is kept" in message
    assert rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT_FILE)["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in rundir.load_model(tmp_path)[0].state_dict().values())
    monkeypatch.undo()
    fit(digits, CFG, TRAIN, run_dir=tmp_path, resume=True, on_nan="skip")  # the suggested way on
    assert rundir.load_config(tmp_path).train.on_nan == "skip"  # recorded: a later resume keeps it


def test_nan_skip_skips_only_those_steps(digits, monkeypatch):
    _nan_at(monkeypatch, {3, 4, 20})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fit(digits, CFG, dataclasses.replace(TRAIN, on_nan="skip"))  # the policy as a setting
    messages = [str(w.message) for w in record]
    assert [m for m in messages if "skipped" in m] == [
        "epoch 1: skipped 2 step(s) whose loss or gradients were not finite",
        "epoch 3: skipped 1 step(s) whose loss or gradients were not finite",
    ]
    assert all(w.filename == __file__ for w in record)  # warnings point at the caller of fit
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values())
    assert [r["images"] for r in result.history] == [285 - 64, 285, 285 - 32]


def test_nan_skip_gives_up_when_every_step_fails(digits, monkeypatch):
    _nan_at(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingError, match="9 steps in a row"):
        fit(digits, CFG, TRAIN, on_nan="skip")


def test_nan_reduce_lr_goes_back_and_halves_the_learning_rate(digits, tmp_path):
    """A real divergence: lr 1e5 without normalization. The resumed run keeps the lowered rate."""
    cfg = default_model_config((8, 8, 1), channels=(8, 16), norm="none")
    train = TrainConfig(epochs=3, lr=1e5, warmup=0.0, batch_size=32, threads=1, device="cpu", seed=2)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step \d+"):
        fit(digits, cfg, train)
    with pytest.warns(UserWarning, match="went back to step 0 and halved the learning rate") as record:
        whole = fit(digits, cfg, train, on_nan="reduce-lr")
    halvings = sum("halved" in str(w.message) for w in record)
    assert 1 <= halvings <= T.MAX_LR_REDUCTIONS
    assert whole.history[0]["lr"] == pytest.approx(1e5 * 0.5**halvings * T.lr_factor("cosine", 8 / 27, 0.0))

    class Killed(Exception):
        pass

    def die(row):
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(digits, cfg, train, run_dir=tmp_path, on_nan="reduce-lr", on_epoch=die)
    assert rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT_FILE)["lr_scale"] == 0.5**halvings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = fit(digits, cfg, train, run_dir=tmp_path, resume=True, on_nan="reduce-lr")
    assert_same(whole.model, resumed.model)


def test_on_nan_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    args = [
        "fit",
        "digits",
        "--widths",
        "8,16",
        "--norm",
        "none",
        "--lr",
        "1e5",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "-q",
    ]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "loss became nan at epoch 1, step" in one_line(result.stderr)
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--on-nan", "reduce-lr"])
    assert result.exit_code == 0, result.output
    assert "convae: warning: loss became nan" in result.stderr and "Traceback" not in result.stderr
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--on-nan", "maybe"])
    assert result.exit_code == 2 and "--on-nan" in result.stderr
