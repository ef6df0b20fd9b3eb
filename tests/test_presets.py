"""Named presets resolve to valid settings, and `convae fit --preset` uses them under explicit options."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convae.errors import ConfigError
from convae.estimator import ConvAutoencoder
from convae.models import build_model
from convae.presets import PRESETS, fit_args, get_preset
from convae.probe.driver import layer_groups

CONVAE = shutil.which("convae", path=str(Path(sys.executable).parent)) or "convae"
SHAPES = {
    "digits": (8, 8, 1),
    "mnist": (28, 28, 1),
    "mnist-convae": (28, 28, 1),
    "fashion-mnist": (28, 28, 1),
    "fashion-mnist-convae": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar10-patch": (32, 32, 3),
    "cifar10-deep": (32, 32, 3),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_to_a_valid_model(name):
    preset = get_preset(name)
    settings = {k: v for k, v in preset.fit.items() if k != "widths"}
    if "widths" in preset.fit:
        settings["channels"] = tuple(int(w) for w in preset.fit["widths"].split(","))
    config = ConvAutoencoder(**settings)._model_config(SHAPES[name])  # validates the architecture for its images
    assert fit_args(name)[0].startswith("--")
    # the layers its probe reads are layers of the model its fit builds
    assert layer_groups(build_model(config), preset.probe["layers"])


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="mnist"):
        get_preset("imagenet")


def test_fit_with_a_preset_and_an_explicit_option(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [CONVAE, "fit", "digits", "--preset", "digits", "--epochs", "1", "--out", str(run), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    preset = get_preset("digits").fit
    assert config["train"]["epochs"] == 1  # the explicit option wins
    assert config["train"]["lr"] == preset["lr"]  # the preset fills the rest
    assert config["model"]["channels"] == [int(w) for w in preset["widths"].split(",")]
    bad = subprocess.run(
        [CONVAE, "fit", "digits", "--preset", "nope", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown preset" in bad.stderr


def test_probe_preset_mnist_convae_whitens_the_rows_with_all_labels(tmp_path, shared_datasets):
    # a tiny model of the mnist-convae preset's shape (three stages), trained on real MNIST digits
    from convae.data import load_dataset

    test = load_dataset("mnist:test", data_dir=shared_datasets)
    run = tmp_path / "run"
    ConvAutoencoder(channels=(4, 8, 16), epochs=1, batch_size=64, seed=0).fit(
        test.images[:2000], run_dir=run, data_spec="mnist:test"
    )

    def probe(*extra):
        out = tmp_path / "r.json"
        proc = subprocess.run(
            [
                CONVAE,
                "probe",
                str(run),
                "--train",
                "mnist:test",
                "--test",
                "mnist:test",
                "--preset",
                "mnist-convae",
                "--layers",
                "stage2.conv1.split+stage3.conv1.split",
                "--labels-per-class",
                "10,all",
                "--seeds",
                "1",
                "--baselines",
                "none",
                "--data-dir",
                str(shared_datasets),
                "-o",
                str(out),
                "-q",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return {r["labels_per_class"]: r for r in json.loads(out.read_text())["rows"]}

    rows = probe()
    assert rows["all"]["normalize"] == "whiten" and rows[10]["normalize"] == "standard"
    assert rows["all"]["dim"] == (2 * 8 + 2 * 16) * 16 and rows["all"]["accuracy"] > 0.9
    assert {r["normalize"] for r in probe("--normalize", "standard").values()} == {"standard"}  # the option wins
