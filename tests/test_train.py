"""Training on real digits: the loss falls, runs resume exactly, run directories load back exactly."""

import csv
import json
import math
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from convae import run as rundir
from convae.config import TrainConfig
from convae.errors import ConvaeError, RunDirError
from convae.models import default_model_config
from convae.tensors import native_bf16
from convae.train import corrupt, evaluate, fit, lr_factor, resolve_epochs, split_train_val


@pytest.fixture(scope="module")
def digits():
    return (load_digits().images * 255 / 16).round().astype(np.uint8)[..., None]


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_training_lowers_the_loss_on_real_digits(digits):
    cfg = default_model_config(digits.shape[1:])
    result = fit(digits, cfg, TrainConfig(epochs=3, batch_size=64, lr=3e-3))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["val_psnr"] > result.history[0]["val_psnr"]
    assert 0 < result.history[-1]["val_ssim"] <= 1


def test_run_directory_holds_config_weights_history_and_checkpoint(digits, tmp_path):
    cfg = default_model_config(digits.shape[1:])
    result = fit(digits[:300], cfg, TrainConfig(epochs=2, batch_size=50, device="cpu"), run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"config.json", "model.safetensors", "history.csv", "checkpoint"}
    config = json.loads((run / "config.json").read_text())
    assert config["convae_version"] and config["model"]["channels"] == list(cfg.channels)
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_mse", "val_psnr", "val_ssim", "lr", "images_per_s"} <= rows[0].keys()
    # no temporary files are left behind
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]

    model, loaded = rundir.load_model(run)
    assert loaded == result.config
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model(x), result.model.eval()(x))


def test_validation_metrics_do_not_depend_on_the_batch_size(digits):
    model = fit(
        digits[:200], default_model_config(digits.shape[1:]), TrainConfig(epochs=1, batch_size=50, device="cpu")
    ).model
    indices = np.arange(len(digits))
    auto = evaluate(model, digits, indices, torch.device("cpu"))
    small = evaluate(model, digits, indices, torch.device("cpu"), batch_size=7)
    assert auto.keys() == small.keys() == {"mse", "psnr", "ssim"}
    for key in auto:
        assert math.isclose(auto[key], small[key], rel_tol=1e-5), key


class Killed(Exception):
    pass


def fit_killed_after_epoch(epoch: int, images, model_config, train_config, run_dir) -> None:
    """A fit interrupted by an exception at the end of `epoch`, its checkpoint left in `run_dir`."""

    def die(row):
        if row["epoch"] == epoch:
            raise Killed

    with pytest.raises(Killed):
        fit(images, model_config, train_config, run_dir=run_dir, on_epoch=die)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(digits, tmp_path):
    cfg = default_model_config(digits.shape[1:])
    train = TrainConfig(epochs=4, batch_size=64, noise=0.1, mask_ratio=0.25, seed=3)
    images = digits[:600]
    whole = fit(images, cfg, train, run_dir=tmp_path / "whole")

    fit_killed_after_epoch(2, images, cfg, train, tmp_path / "cut")
    with pytest.raises(RunDirError, match="--resume"):
        fit(images, cfg, train, run_dir=tmp_path / "cut")
    resumed = fit(images, cfg, train, run_dir=tmp_path / "cut", resume=True)
    _assert_same_weights(whole.model, resumed.model)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert rundir.read_history(tmp_path / "cut")[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"])


@pytest.mark.parametrize("native", [False, True])
def test_amp_trains_in_bf16_exactly_where_the_cpu_computes_it_natively(digits, monkeypatch, native):
    # the machine's own capabilities replaced: both branches run on any CPU (bf16 is emulated where not native)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native, "amx_bf16": False})
    assert native_bf16(torch.device("cpu")) is native
    cfg = default_model_config(digits.shape[1:])
    runs = {
        amp: fit(digits[:256], cfg, TrainConfig(epochs=1, batch_size=64, device="cpu", amp=amp)).model
        for amp in (True, False)
    }
    weights = [run.state_dict()["encoder.stage1.conv1.0.weight"] for run in (runs[True], runs[False])]
    assert torch.equal(*weights) is not native  # bf16 rounding shows in the weights, or amp changed nothing
    assert (weights[0] - weights[1]).abs().max() < 0.01


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_amp_uses_bf16_on_gpus_from_ampere_on(monkeypatch, capability, native):
    # V100 and T4 emulate bf16, slower than their fp32; A100 and H100 compute it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(torch.device("cuda:0")) is native


def test_resume_without_a_checkpoint_is_a_clear_error(digits, tmp_path):
    with pytest.raises(RunDirError, match="nothing to resume"):
        fit(digits[:100], default_model_config((8, 8, 1)), TrainConfig(epochs=1), run_dir=tmp_path, resume=True)


def test_time_budget_stops_training(digits):
    result = fit(digits, default_model_config((8, 8, 1)), TrainConfig(max_time=1.0, batch_size=32))
    assert sum(r["seconds"] for r in result.history) < 10
    assert result.history


def test_wrong_image_shape_is_refused(digits):
    with pytest.raises(ConvaeError, match="configured for 28x28x1"):
        fit(digits, default_model_config((28, 28, 1)), TrainConfig(epochs=1))


def test_diverging_loss_stops_with_the_epoch_and_step(digits, tmp_path):
    cfg = default_model_config((8, 8, 1), norm="none")
    with pytest.raises(ConvaeError, match=r"loss became .* epoch 1"):
        fit(digits, cfg, TrainConfig(epochs=2, lr=1e12, warmup=0.0, batch_size=16), run_dir=tmp_path / "r")


def test_corruptions_keep_shape_and_range():
    x = torch.rand(4, 3, 37, 53)
    g = torch.Generator().manual_seed(0)
    noisy = corrupt(x, TrainConfig(noise=0.5), g)
    assert noisy.shape == x.shape and noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, x)
    masked = corrupt(x, TrainConfig(mask_ratio=0.5), g)
    hidden = (masked == 0).float().mean().item()
    assert 0.3 < hidden < 0.7


def test_schedule_warms_up_then_decays():
    assert lr_factor("cosine", 0.0, 0.1) == 0
    assert lr_factor("cosine", 0.1, 0.1) == pytest.approx(1)
    assert lr_factor("cosine", 1.0, 0.1) == pytest.approx(0, abs=1e-9)
    values = [lr_factor("onecycle", p / 100, 0.3) for p in range(101)]
    assert max(values) == pytest.approx(1, abs=1e-3) and values[-1] < 0.01
    assert lr_factor("constant", 0.5, 0.1) == 1


def test_auto_epochs_and_validation_split():
    assert resolve_epochs(TrainConfig(), 60000) == 2
    assert resolve_epochs(TrainConfig(), 1000) == 60
    assert resolve_epochs(TrainConfig(max_time=5), 1000) is None
    train, val = split_train_val(1000, 0.05, seed=0)
    assert len(val) == 50 and len(set(train) | set(val)) == 1000 and not set(train) & set(val)
    assert math.isclose(len(split_train_val(1000, 0.0, 0)[1]), 0)


FAULTS_CHILD = r"""
import resource, sys
import numpy as np
import convae.train as T
from convae.config import TrainConfig
from convae.models import default_model_config
images = np.random.default_rng(0).integers(0, 256, (320, 16, 16, 1), dtype=np.uint8)
faults = []
# fp32 on any CPU: bf16 autocast, where native, adds casts whose buffers change the counts
T.fit(images, default_model_config((16, 16, 1)),
      TrainConfig(epochs=3, batch_size=64, val_fraction=0.0, threads=1, device="cpu", amp=False),
      on_epoch=lambda row: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
print((faults[-1] - faults[0]) / 10)  # after a first epoch's warm-up
"""


BIG_MAPS_CHILD = r"""
import resource, sys
import numpy as np
import convae.train as T
from convae._memory import keep_freed_memory
from convae.config import TrainConfig
from convae.models import default_model_config
keep_freed_memory(all_sizes=sys.argv[1] == "on")  # what `convae fit` asks for
images = np.random.default_rng(0).integers(0, 256, (160, 64, 64, 1), dtype=np.uint8)
faults = []
# 128 maps of 64x64 floats, 32 images a batch: 64 MiB, past the 32 MiB that glibc's mmap threshold can be raised to
T.fit(images, default_model_config((64, 64, 1), channels=(128,), decoder="light"),
      TrainConfig(epochs=3, batch_size=32, val_fraction=0.0, threads=1, device="cpu"),
      on_epoch=lambda row: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
print((faults[-1] - faults[0]) / 10)
"""


def faults_per_step(child: str, mode: str) -> float:
    """Minor page faults a training step, in a fresh process (malloc settings are per process)."""
    out = subprocess.run([sys.executable, "-c", child, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)


@glibc_only
def test_all_sizes_keeps_maps_over_32_mib_too():
    """What `convae fit` asks for, and the training that follows (asking for less) keeps."""
    threshold_only, all_sizes = faults_per_step(BIG_MAPS_CHILD, "off"), faults_per_step(BIG_MAPS_CHILD, "on")
    assert threshold_only > 10_000, threshold_only  # each 64 MiB map mmapped and faulted in afresh
    assert all_sizes < threshold_only / 10, (all_sizes, threshold_only)


@glibc_only
def test_training_steps_do_not_page_fault_their_buffers_back():
    """Freed activation buffers are reused, not returned to the kernel and faulted in again next step."""
    # kept memory: 0-102 faults a step measured in fp32. glibc's defaults are no fixed contrast:
    # its adaptive mmap threshold gave 74 to 5,200 a step from run to run, so they are not asserted.
    assert faults_per_step(FAULTS_CHILD, "on") < 200
