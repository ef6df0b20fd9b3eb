"""Named presets: recommended `convae fit` settings (and the probe that goes with them) per dataset.

``convae fit mnist --preset mnist`` takes the preset's values as defaults; options given on
the command line override them. ``convae probe RUN --preset mnist`` probes the layers,
pooling and feature normalization the preset was measured with. The values are those measured
by ``benchmarks/quality.py`` on a 2-core CPU (see ``benchmarks/RESULTS.md``); a preset's
`max_time` is the wall-clock training budget the preset was measured with there (a preset in
`epochs` trains the same model on any machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    # `convae fit` option values, by the name of the fit function's parameter
    # (widths as "32,64,128", as on the command line)
    fit: dict[str, Any] = field(default_factory=dict)
    # `run_probe` keyword arguments that go with the preset (layers, pool, normalize, augment, c_scale, max_iter)
    probe: dict[str, Any] = field(default_factory=dict)


# The hierarchical sparse autoencoder the cifar10 preset trains; fashion-mnist adds a third stage
# (each chose it on its own validation split: RESULTS.md)
HIERARCHY_FIT: dict[str, Any] = dict(
    arch="hsparse", widths="800,3200", kernel_size=5, groups=64, group_size=32, upper_image_fraction=0.25, epochs=4
)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "digits",
            "scikit-learn's 8x8 digits (1,437 train images): the default two-stage model, 20 epochs at lr 3e-3 (as `make demo`)",
            fit=dict(widths="32,64", convs_per_stage=1, epochs=20, batch_size=64, lr=0.003),
            probe=dict(layers="stage1,bottleneck", pool="grid4"),
        ),
        Preset(
            "mnist",
            "MNIST 28x28, hierarchical: the hierarchical sparse autoencoder (--arch hsparse), three stages: 400 "
            "k-sparse 5x5 filters, then 16 receptive-field groups of 32 co-varying channels x 50 filters on 3x3 "
            "windows (800 stage-2 channels), then 16 groups x 100 (1,600 stage-3 channels), 2 epochs a stage; "
            "probed with stages 1 + 2 + 3 averaged over the quadrants, each stage's features whitened in blocks "
            "of at most 2,048 columns, each on its own, before the classifier (with all labels), in 8-bit codes "
            "of each column's range, logistic regression's C x4 and 300 iterations (chosen on the last 10,000 "
            "train images: 0.9953, against 0.9945 for an 800-channel third stage and 0.9939 for the two-stage "
            "model that was this preset; the stages whitened apart 0.9952 against 0.9950 whitened together, in "
            "27 s of fitting instead of 47; 8-bit codes 0.9951 against 16-bit 0.9952, in 3.0 GB instead of 5.5; "
            "blocks of 3,200 columns 0.9951 and of 1,600-1,829 0.9950 against whole stages' 0.9953 on one model; "
            "the probe on the test split in 2.51 and 2.43 GB instead of 3.19: RESULTS.md)",
            fit=dict(
                arch="hsparse",
                widths="400,800,1600",
                kernel_size=5,
                groups=16,
                group_size=32,
                upper_image_fraction=0.25,
                epochs=6,
            ),
            probe=dict(
                layers="stage1+stage2+stage3",
                pool="grid2",
                normalize="whiten-blocks",
                whiten_block_columns=2048,
                c_scale=4.0,
                max_iter=300,
                dtype="uint8",
            ),
        ),
        Preset(
            "mnist-convae",
            "MNIST 28x28 with the ConvAE (the mnist preset before the hierarchical sparse model): the default "
            "model (one conv per stage, batch 64) for 2 epochs (more lower the reconstruction error, not the "
            "probe's error); probed with stage2's and stage3's conv maps sign-split, "
            "concatenated, and whitened before the classifier; features held in 16-bit (the same validation "
            "accuracy as 32-bit, half the memory)",
            fit=dict(widths="32,64,128", convs_per_stage=1, batch_size=64, epochs=2),
            probe=dict(
                layers="stage2,bottleneck,stage2.conv1.split+stage3.conv1.split",
                pool="grid4",
                normalize="whiten",
                dtype="float16",
            ),
        ),
        Preset(
            "fashion-mnist",
            "Fashion-MNIST 28x28, hierarchical: the cifar10 preset's hierarchical sparse autoencoder with 11x11 "
            "stage-1 patches (800 k-sparse filters, 64 receptive-field groups x 50 filters on 3x3 windows: 3,200 "
            "stage-2 channels) and a third stage of 64 groups x 25 filters (1,600 channels), 2 epochs a stage; "
            "probed with stages 1 + 2 + 3 averaged over the quadrants, in 8-bit codes of each column's range, "
            "logistic regression's C x2 fitted to its minimum by preconditioned L-BFGS (chosen on the last "
            "10,000 train images: 11x11 patches 0.9302 trained, +1.55 over their random weights, against 5x5 "
            "patches' 0.9342 and +0.79 (7x7 +0.93, 9x9 +1.33): the largest patches the only ones at both 0.93 "
            "and +1.5; the 5x5 model 0.9337 against the two-stage model's 0.9287 and the ConvAE preset's 0.9177; "
            "preconditioned C x2 0.9344 against 300 plain steps at C x4 0.9327; 8-bit codes 0.9342 against "
            "16-bit 0.9344, in 3.6 GB instead of 6.3: RESULTS.md)",
            fit=dict(HIERARCHY_FIT, widths="800,3200,1600", kernel_size=11, epochs=6),
            probe=dict(
                layers="stage1+stage2+stage3",
                pool="grid2",
                c_scale=2.0,
                max_iter=300,
                precondition=True,
                dtype="uint8",
            ),
        ),
        Preset(
            "fashion-mnist-convae",
            "Fashion-MNIST 28x28 with the ConvAE (the fashion-mnist preset before the hierarchical sparse model): "
            "the MNIST model with the light decoder (more epochs a minute), a 10-minute budget on a 2-core CPU; "
            "probed with stage1's and stage2's conv maps sign-split and the code, concatenated",
            fit=dict(widths="32,64,128", convs_per_stage=1, decoder="light", batch_size=64, max_time=600.0),
            probe=dict(layers="stage2,bottleneck,stage1.conv1.split+stage2.conv1.split+bottleneck", pool="grid4"),
        ),
        Preset(
            "cifar10",
            "CIFAR-10 32x32x3, hierarchical: the hierarchical sparse autoencoder (--arch hsparse), 800 k-sparse "
            "5x5 filters on whitened patches, then 64 receptive-field groups of 32 co-varying stage-1 channels, "
            "each coded by 50 filters on 3x3 windows of the pooled maps (3,200 stage-2 channels); trained "
            "greedily, 2 epochs a stage, stage 2 on windows of a quarter of each batch's images. Probed with "
            "stage 1 + stage 2 averaged over the quadrants, fitted on the train images and their mirror images "
            "(train-time flips; test images never flipped), in 8-bit codes of each column's range, logistic "
            "regression's C x2 fitted to its minimum by preconditioned L-BFGS (each lever chosen on the last "
            "10,000 train images: 64 groups 0.8073 against 32 groups' 0.7944 without flips, 0.8243 with them; "
            "preconditioned C x2 0.8241 against 300 plain steps at C x4 0.8245; 8-bit codes 0.8259 against "
            "16-bit 0.8241, in 3.8 GB instead of 7.2; test split: 0.8277 so in 16-bit, its fit 220 s against "
            "500; 0.8252 with the plain fit, random weights probed alike 0.7665, stage 1 alone 0.7810: RESULTS.md)",
            fit=dict(HIERARCHY_FIT),
            probe=dict(
                layers="stage1+stage2",
                pool="grid2",
                augment="flip",
                c_scale=2.0,
                max_iter=300,
                precondition=True,
                dtype="uint8",
            ),
        ),
        Preset(
            "cifar10-patch",
            "CIFAR-10 32x32x3, the single-layer reference (the cifar10 preset before hsparse): the sparse "
            "autoencoder of whitened 5x5 patches (1,600 filters, each patch rebuilt from its strongest filter: gradient-descent k-means), 5 epochs; probed with its sign-split responses "
            "averaged over the four quadrants (12,800 values), the classifiers also fitting every train image "
            "mirrored and scoring each test image with its mirror image, logistic regression's C x4 fitted by "
            "preconditioned L-BFGS (at most 1,000 steps), in 16-bit (each lever picked on the last 10,000 train "
            "images; 16-bit: 0.8009 against 32-bit's 0.8011; preconditioned 0.7959 in 220 s against 1,000 plain "
            "steps' 0.7965 in 624 s; test split, one model: 0.7981 both ways, the probe 5 minutes against 25)",
            fit=dict(arch="sparse", widths="1600", kernel_size=5, sparse_k=1, batch_size=64, epochs=5),
            probe=dict(
                layers="conv1.split",
                pool="grid2",
                augment="flip-tta",
                c_scale=4.0,
                max_iter=1000,
                precondition=True,
                dtype="float16",
            ),
        ),
        Preset(
            "cifar10-deep",
            "CIFAR-10 32x32x3 with the ConvAE (the cifar10 preset before the patch model): a wide first stage "
            "(256,128,256) with the light decoder, light denoising, a 15-minute budget on a 2-core CPU; probed with "
            "stage1's and stage2's conv maps sign-split (stage1.conv1.split+stage2.conv1.split)",
            fit=dict(
                widths="256,128,256", convs_per_stage=1, decoder="light", batch_size=64, noise=0.05, max_time=900.0
            ),
            probe=dict(layers="stage1,stage2,bottleneck,stage1.conv1.split+stage2.conv1.split", pool="grid4"),
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}") from None


def fit_settings(name: str, settings: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """`settings` (``convae fit`` options by parameter name) with the preset's values where the user
    gave none (`given`: the options given on the command line).

    Giving --epochs or --max-time replaces the preset's training length (both of them).
    """
    out = dict(settings)
    length_given = bool({"epochs", "max_time"} & given)
    for key, value in get_preset(name).fit.items():
        if key in given or (length_given and key in ("epochs", "max_time")):
            continue
        if key not in out:
            raise ConfigError(f"preset {name}: unknown fit option {key}")
        out[key] = value
    return out


def fit_args(name: str) -> list[str]:
    """The preset's `convae fit` options as command-line arguments (for scripts and docs)."""
    out: list[str] = []
    for key, value in get_preset(name).fit.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out
