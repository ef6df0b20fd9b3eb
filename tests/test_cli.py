"""The installed `convae` entry point, run as a user would, in real subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from cli_helpers import CONVAE, convae
from cli_helpers import assert_user_error as _assert_user_error


def assert_user_error(proc, *fragments):
    # click's own usage errors ("Error: No such option") count as one-line user errors too
    _assert_user_error(proc, *fragments, prefixes=("convae: error:", "Error:"))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = convae("fit", "digits", "--out", run, "--epochs", 3, "--quiet")
    assert "run directory" in proc.stdout
    return run


def test_fit_writes_a_run_directory(digits_run):
    assert {p.name for p in digits_run.iterdir()} >= {"config.json", "model.safetensors", "history.csv", "checkpoint"}


def test_info_prints_the_layer_table(digits_run):
    out = convae("info", digits_run).stdout
    for column in ("layer", "shape", "channels", "stride", "receptive_field", "params"):
        assert column in out
    assert "stage1.conv1" in out and "bottleneck" in out and "total" in out


def test_reconstruct_writes_a_png_grid(digits_run, tmp_path):
    out = tmp_path / "grid.png"
    convae("reconstruct", digits_run, "digits:test", "-o", out, "-n", 8)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height > 50


def test_module_entry_point_works():
    proc = subprocess.run([sys.executable, "-m", "convae", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fit" in proc.stdout


def test_help_does_not_load_torch_and_every_public_name_resolves():
    code = (
        "import sys; from convae.cli import main\n"
        "try: main(['fit', '--help'], standalone_mode=False)\n"
        "finally: print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--widths" in proc.stdout and proc.stdout.split()[-1] == "False"
    import convae

    for name in convae.__all__:
        assert getattr(convae, name) is not None, name
    assert set(convae.__all__) <= set(dir(convae))


def test_fit_on_a_folder_and_an_npz(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    for cls in ("cats", "dogs"):
        (folder / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    convae("fit", folder, "--out", tmp_path / "r1", "--image-size", 16, "--epochs", 1, "-q", "--widths", "8,16")
    assert (tmp_path / "r1" / "model.safetensors").is_file()
    np.savez(tmp_path / "a.npz", images=rng.random((40, 12, 10)).astype(np.float32))
    convae("fit", tmp_path / "a.npz", "--out", tmp_path / "r2", "--epochs", 1, "-q", "--arch", "dense", "--no-amp")
    assert "arch=dense" in convae("info", tmp_path / "r2").stdout
    assert json.loads((tmp_path / "r2" / "config.json").read_text())["train"]["amp"] is False
    assert json.loads((tmp_path / "r1" / "config.json").read_text())["train"]["amp"] is True


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["fit", "nosuchdata", "--out", "{tmp}/r"], ["nosuchdata"]),
        (["fit", "digits", "--out", "{tmp}/r", "--widths", "8,8,8,8"], ["too small for 4 stages"]),
        (["fit", "digits", "--out", "{tmp}/r", "--widths", "8,x"], ["--widths"]),
        (["fit", "digits", "--out", "{tmp}/r", "--batch-size", "0"], ["batch_size"]),
        (["fit", "digits", "--out", "{tmp}/r", "--resume"], ["nothing to resume"]),
        (["fit", "digits", "--out", "{tmp}/r", "--device", "cuda:0"], []),
        (["info", "{tmp}/missing"], ["no such run directory"]),
        (["reconstruct", "{tmp}/missing", "digits", "-o", "{tmp}/x.png"], ["no such run directory"]),
        (["fit", "digits", "--out", "{tmp}/r", "--norm", "layer"], []),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, args, fragments):
    if "cuda:0" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = convae(*[a.format(tmp=tmp_path) for a in args], check=False)
    assert_user_error(proc, *fragments)


def test_existing_run_is_never_overwritten(digits_run):
    before = (digits_run / "model.safetensors").read_bytes()
    assert_user_error(convae("fit", "digits", "--out", digits_run, "-q", check=False), "--resume")
    assert (digits_run / "model.safetensors").read_bytes() == before


def test_broken_config_json_is_named(digits_run, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(digits_run, run)
    (run / "config.json").write_text('{"model": {"channels": "many"}}')
    assert_user_error(convae("info", run, check=False), "config.json", "channels")
    (run / "config.json").write_text((digits_run / "config.json").read_text().replace('"0.1.0"', '"9.0.0"'))
    assert_user_error(convae("info", run, check=False), "newer")


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    """A real SIGKILL mid-training; --resume finishes with exactly the weights of a run never killed."""
    args = ["fit", "digits", "--epochs", 6, "--batch-size", 32, "--threads", 1, "--seed", 1, "-q"]
    convae(*args, "--out", tmp_path / "whole")

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [CONVAE, *map(str, args), "--out", str(cut)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not (cut / "checkpoint" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere inside a later epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"

    convae(*args, "--out", cut, "--resume")
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(cut / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key], err_msg=key)


def test_fit_option_defaults_are_the_configs_defaults():
    """The CLI keeps literal defaults (so `convae --help` need not import torch): they must not drift."""
    from convae.cli import fit as fit_command
    from convae.config import TrainConfig

    defaults = {p.name: p.default for p in fit_command.params}
    for name in (
        "epochs",
        "max_time",
        "batch_size",
        "lr",
        "weight_decay",
        "schedule",
        "loss",
        "noise",
        "mask_ratio",
        "val_fraction",
        "seed",
        "device",
        "threads",
    ):
        assert defaults[name] == getattr(TrainConfig, name), name
