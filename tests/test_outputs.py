"""The output guard (convae.outputs): nothing a user owns is lost or mixed up (issue #28).

Real processes and real files: two extractions racing for one output, symlinks and FIFOs where
convae keeps its temporaries, outputs that are inputs or a run's own files, `fit` and `demo`
into folders of the user's files. Models are tiny (digits, one epoch), so each test takes seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_helpers import assert_user_error, convae
from convae import ConfigError, ConvAutoencoder, RunDirError
from convae import outputs as guard
from convae.data import load_dataset

TINY = dict(channels=(4, 8), epochs=1, batch_size=64, device="cpu", threads=1)

# Runs `convae ARGS` with the rename onto a path matching a pattern held until a file appears:
# the extraction has written every row and still holds its output's lock.
_HOLD_SHIM = r"""
import fnmatch, os, sys, time
pattern, marker, go = sys.argv[1:4]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if fnmatch.fnmatch(os.fspath(dst), pattern):
        open(marker, "w").close()
        while not os.path.exists(go):
            time.sleep(0.01)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["convae", *sys.argv[4:]]
from convae.cli import main
main()
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two tiny runs of different weights, and 300 digits as an .npy file."""
    root = tmp_path_factory.mktemp("outputs")
    images = load_dataset("digits", "train").images[:300]
    np.save(root / "imgs.npy", images)
    for seed in (0, 1):
        ConvAutoencoder(seed=seed, **TINY).fit(images, run_dir=root / f"run{seed}")
    return root


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _wait_for(path, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_extraction_to_the_same_output_is_refused_and_the_first_stays_whole(work, tmp_path):
    out, marker, go = tmp_path / "feats.npy", tmp_path / "held", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SHIM, str(out), str(marker), str(go)]
        + ["extract", str(work / "run0"), str(work / "imgs.npy"), "-o", str(out), "-q", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(marker, first)  # every row written, OUT.partial not yet renamed: the lock is held
        second = convae("extract", work / "run1", work / "imgs.npy", "-o", out, "-q", "--device", "cpu", check=False)
        assert_user_error(second, f"{out} is being written by another convae process (pid {first.pid})")
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    convae("extract", work / "run0", work / "imgs.npy", "-o", tmp_path / "alone.npy", "-q", "--device", "cpu")
    assert out.read_bytes() == (tmp_path / "alone.npy").read_bytes()  # every row from run0's model
    assert not guard.lock_path_of(out).exists()  # the lock file goes with the lock


@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "fifo"])
def test_something_at_the_partial_file_is_refused_and_never_written_through(work, tmp_path, kind):
    out, victim = tmp_path / "feats.npy", tmp_path / "victim.txt"
    partial = tmp_path / "feats.npy.partial"
    if kind == "fifo":
        os.mkfifo(partial)  # opening it to read would block: it must not be opened at all
    else:
        if kind == "symlink":
            victim.write_text("the user's file")
        partial.symlink_to(victim)
    proc = convae("extract", work / "run0", work / "imgs.npy", "-o", out, "-q", "--device", "cpu", check=False)
    assert_user_error(proc, "feats.npy.partial", "remove it and run again")
    assert not out.exists()
    if kind == "symlink":
        assert victim.read_text() == "the user's file"
    else:
        assert not victim.exists()


def test_a_leftover_partial_of_another_extraction_is_replaced_not_written_into(work, tmp_path):
    """A hard link at OUT.partial: started anew on a file of its own, the other name untouched."""
    out, other = tmp_path / "feats.npy", tmp_path / "other.bin"
    other.write_bytes(b"x" * 100)
    os.link(other, tmp_path / "feats.npy.partial")
    convae("extract", work / "run0", work / "imgs.npy", "-o", out, "-q", "--device", "cpu")
    assert other.read_bytes() == b"x" * 100
    assert np.load(out).shape[0] == 300


@pytest.mark.parametrize(
    "case", ["extract-onto-its-input", "extract-onto-a-hard-link-of-it", "extract-onto-a-folder", "probe-onto-config"]
)
def test_an_output_that_is_an_input_or_a_run_file_is_refused_before_any_work(work, tmp_path, case):
    before = _snapshot(work)
    if case == "probe-onto-config":
        args = ["probe", work / "run0", "--train", "digits:train", "--test", "digits:test"]
        args += ["-o", work / "run0" / "config.json"]
        expected = "config.json of the run"
    elif case == "extract-onto-a-folder":  # found before the rows are computed, not after
        (tmp_path / "feats.npy").mkdir()
        args = ["extract", work / "run0", work / "imgs.npy", "-o", tmp_path / "feats.npy", "-q", "--device", "cpu"]
        expected = "is a folder; give a file name"
    else:
        target = work / "imgs.npy"
        if case == "extract-onto-a-hard-link-of-it":
            target = tmp_path / "imgs-link.npy"
            os.link(work / "imgs.npy", target)
        args = ["extract", work / "run0", work / "imgs.npy", "-o", target, "-q", "--device", "cpu"]
        expected = "is also an input of this command"
    assert_user_error(convae(*args, check=False), expected)
    assert _snapshot(work) == before


def test_show_refuses_an_output_inside_a_runs_checkpoint_folder(work):
    target = work / "run0" / "checkpoint" / "view.png"
    proc = convae("show", work / "run0", "--view", "filters", "-o", target, check=False)
    assert_user_error(proc, "inside checkpoint/ of the run")
    assert not target.exists()


def test_fit_into_a_folder_of_other_files_is_refused_unless_forced_and_keeps_them(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / ".config.json.draft.tmp").write_text("looks like a temporary, is the user's")
    mine = _snapshot(folder)
    args = ["fit", "digits", "--out", folder, "--epochs", 1, "--widths", "4,8", "--threads", 1, "-q"]
    assert_user_error(convae(*args, check=False), "not a convae run", "--force")
    assert _snapshot(folder) == mine  # nothing written, nothing removed
    convae(*args, "--force")
    assert all(p.read_bytes() == data for p, data in mine.items())
    assert (folder / "model.safetensors").is_file() and guard.is_run_dir(folder)


def test_force_never_replaces_a_file_of_a_runs_name(tmp_path, one_thread):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"my": "settings"}')
    images = load_dataset("digits", "train").images[:200]
    for force in (False, True):
        with pytest.raises(RunDirError, match="config.json"):
            ConvAutoencoder(**TINY).fit(images, run_dir=folder, force=force)
    assert (folder / "config.json").read_text() == '{"my": "settings"}'


def test_demo_replaces_its_own_run_and_keeps_the_users_files(tmp_path, monkeypatch, one_thread):
    """The real demo folder handling and training (one epoch); probe and report stubbed for time."""
    from convae import demo

    monkeypatch.setitem(demo.DEMO_SETTINGS, "epochs", 1)
    monkeypatch.setattr(demo, "run_probe", lambda *a, **k: [])
    monkeypatch.setattr(demo, "write_report", lambda run_dir, data, path, **k: type("R", (), {"path": path})())
    out = tmp_path / "demo"
    demo.run_demo(out)
    (out / "notes.txt").write_text("mine")
    (out / "digits-run" / "mine.txt").write_text("mine too")
    first_mtime = (out / "digits-run" / "model.safetensors").stat().st_mtime_ns
    demo.run_demo(out)  # replaces the previous demo run, not the folder
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "digits-run" / "mine.txt").read_text() == "mine too"
    assert (out / "digits-run" / "model.safetensors").stat().st_mtime_ns >= first_mtime  # retrained


def test_demo_refuses_a_run_folder_that_is_not_its_own(tmp_path, monkeypatch):
    from convae import demo

    run = tmp_path / "demo" / "digits-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"my": "settings"}')
    (run / "history.csv").write_text("mine")
    with pytest.raises(RunDirError, match="config.json"):
        demo.run_demo(tmp_path / "demo")
    assert (run / "history.csv").read_text() == "mine"


def test_an_output_lock_is_exclusive_and_leaves_no_file(tmp_path):
    out = tmp_path / "a.csv"
    with guard.lock_output(out):
        assert guard.lock_path_of(out).read_text().strip() == str(os.getpid())
        with pytest.raises(guard.OutputError, match=rf"being written by another convae process \(pid {os.getpid()}\)"):
            guard.lock_output(out)  # flock: a second open file, even in this process, is another writer
    assert not guard.lock_path_of(out).exists()
    guard.lock_path_of(out).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(guard.OutputError, match="not convae's lock file"):
        guard.lock_output(out)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("command", ["show", "report", "probe"])
def test_seeds_out_of_range_are_one_line(work, tmp_path, command):
    run = work / "run0"
    args = {
        "show": ["show", run, "digits", "--view", "embedding", "-o", tmp_path / "e.png", "--seed", -1],
        "report": ["report", run, "digits", "-o", tmp_path / "out.html", "--seed", -1],
        "probe": [
            "probe",
            run,
            "--data",
            "digits",
            "--test-fraction",
            0.2,
            "--split-seed",
            -1,
            "-o",
            tmp_path / "p.json",
        ],
    }[command]
    assert_user_error(convae(*args, check=False), "seed")


# One set of limits (item 6): what fit accepts, its config.json loader reads back.
@pytest.mark.parametrize(
    "setting, fragment",
    [
        (dict(noise=float("inf")), "noise must be a finite number"),
        (dict(max_time=float("inf")), "max_time must be a finite number"),
        (dict(arch="sparse", whiten_eps=float("inf")), "whiten_eps must be a finite number"),
        (dict(latent_channels=70_000), "latent_channels = 70000 is implausibly large"),
        (dict(kernel_size=999), "kernel_size = 999 is implausibly large"),
        (dict(threads=100_000), "threads = 100000 is implausibly large"),
        (dict(convs_per_stage=1000), "convs_per_stage = 1000 is implausibly large"),
    ],
)
def test_fit_refuses_what_its_config_loader_would_refuse_before_training(tmp_path, setting, fragment):
    images = load_dataset("digits", "train").images[:100]
    with pytest.raises(ConfigError, match=fragment):
        ConvAutoencoder(**{**TINY, **setting}).fit(images, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before a run directory exists


def test_fit_limits_through_the_cli(tmp_path):
    proc = convae("fit", "digits", "--out", tmp_path / "run", "--noise", "inf", "-q", check=False)
    assert_user_error(proc, "noise must be a finite number")
    assert not (tmp_path / "run").exists()


def test_a_replaced_feature_file_keeps_the_mode_the_user_gave_it(work, tmp_path, one_thread):
    from convae import FeatureExtractor, extract_to_file, load_model

    images, out = np.load(work / "imgs.npy"), tmp_path / "feats.npy"
    extractor = FeatureExtractor(load_model(work / "run0")[0], "stage1", "avg")
    extract_to_file(extractor, images, out)
    out.chmod(0o600)  # private features
    extract_to_file(FeatureExtractor(load_model(work / "run1")[0], "stage1", "avg"), images, out)
    assert out.stat().st_mode & 0o777 == 0o600


def test_a_full_disk_during_extraction_names_the_file_and_the_way_on(work, small_disk):
    """A real 1 MiB tmpfs: the rows stop at ENOSPC, the message says which file."""
    images = np.repeat(np.load(work / "imgs.npy"), 25, axis=0)  # their stage1 maps: more than the disk holds
    np.save(small_disk.parent / "many.npy", images)
    out = small_disk / "feats.npy"
    args = ["extract", work / "run0", small_disk.parent / "many.npy", "-o", out, "--layers", "stage1", "-q"]
    proc = convae(*args, "--device", "cpu", check=False)
    assert_user_error(proc, f"cannot write {out}.partial: no space left on device", "run the same command again")
    assert not out.exists()
