"""The model's settings: one typed record, config.json's ``model`` object (torch-free).

``ModelConfig`` stays one flat record, as every config.json written so far has it; each net
reads only its own fields (its ``config_fields``) and checks them itself
(``check_config``), so this module knows no architecture but their names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..errors import ConfigError
from ..limits import check_model_limits, check_numbers
from .registry import ARCHITECTURES, net_class

Norm = Literal["batch", "group", "none"]
Activation = Literal["relu", "leaky_relu", "gelu", "silu", "elu"]
Downsample = Literal["max", "avg", "stride"]
Upsample = Literal["nearest", "bilinear", "transpose"]
Bottleneck = Literal["conv", "dense"]
Decoder = Literal["mirror", "light"]


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture setting; `arch` says which net (see ``convae.models.registry``) reads them."""

    arch: str = "conv"
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)  # (H, W) the model was built for
    channels: tuple[int, ...] = (32, 64, 128)  # one entry per encoder stage (arch sparse: its filters)
    convs_per_stage: int = 1
    kernel_size: int = 3
    norm: Norm = "batch"
    activation: Activation = "relu"
    downsample: Downsample = "max"
    upsample: Upsample = "nearest"
    # "mirror": each decoder stage upsamples, then convolves at the finer size (the encoder
    # mirrored). "light": it convolves first, at the coarser size (a quarter of the pixels),
    # then upsamples: the decoder's FLOPs fall about fourfold, so training sees more images a
    # minute, and the encoder's features are what the decoder is for.
    decoder: Decoder = "mirror"
    bottleneck: Bottleneck = "conv"
    latent_channels: int = 0  # conv bottleneck: 0 keeps the last stage's maps as the code
    latent_dim: int = 128  # dense bottleneck, and the code size of arch="dense"
    hidden: tuple[int, ...] = (512,)  # arch="dense": hidden layer widths
    # Winner-take-all sparsity of the code the decoder sees (conv arch; features are unaffected):
    # each code map keeps only its largest value per image, and each channel only its top
    # `code_wta` fraction of the batch's images. 0: off. Makhzani & Frey's conv WTA autoencoder.
    code_wta: float = 0.0
    # arch="sparse" (channels = (filters,), kernel_size = the patch side): filters kept per patch
    # when reconstructing it (the k of a k-sparse autoencoder), the ZCA whitening's eigenvalue
    # floor, and random patches each training image gives per step.
    sparse_k: int = 1
    whiten_eps: float = 0.1
    patches_per_image: int = 16
    # arch="hsparse" (channels = each stage's filters; kernel_size = stage 1's patch side): the
    # patch side of the stages above it (in positions of the pooled map below), the pooling
    # between stages (q x q average, stride q), each location's values after PCA between stages
    # (0: all 2K of them), and the soft threshold of the sign split the stages and probe read.
    upper_kernel: int = 3
    pool_size: int = 2
    reduce_dim: int = 128
    split_threshold: float = 0.25
    # arch="hsparse": the stages above the first code receptive-field groups instead of PCA-reduced
    # maps when `groups` > 0: that many groups of `group_size` co-varying channels of the map below,
    # each with its own coder (channels[k] // groups filters), as Coates and Ng's 2011 networks.
    groups: int = 0
    group_size: int = 32
    # arch="hsparse": the fraction of each batch's images whose maps the stages above the first
    # draw their training windows from. Such a stage's step must run stage 1 over whole images
    # (most of its time); the rest of the batch goes unused by it, as the design this model ports
    # trained its second stage on the maps of 5,000 images.
    upper_image_fraction: float = 1.0

    # Fields added after config.json files were first written: what such a file meant.
    LEGACY_DEFAULTS: ClassVar[dict] = {"decoder": "mirror"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the settings every net shares, then the net's own (``check_config``).

        The limits come first: they are what a config.json loader accepts (``convae.limits``),
        and they keep an absurd size from reaching a net's own checks.
        """
        check_numbers(self)
        check_model_limits(self)
        h, w = self.image_size
        if h < 1 or w < 1:
            raise ConfigError(f"image size {h}x{w} must be positive")
        if self.in_channels < 1:
            raise ConfigError(f"channels must be at least 1, got {self.in_channels}")
        net_class(self.arch).check_config(self)


def stage_sizes(image_size: Sequence[int], num_stages: int) -> list[tuple[int, int]]:
    """Spatial size at the input of each stage, then after the last one.

    Downsampling rounds up (ceil mode), so odd sizes lose no pixels.
    """
    h, w = image_size
    sizes = [(h, w)]
    for _ in range(num_stages):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def max_stages(image_size: Sequence[int]) -> int:
    """The most 2x-downsampling stages an image of this size allows (each keeps at least 2x2)."""
    n = 0
    while all(s >= 2 for s in stage_sizes(image_size, n + 1)[n]):
        n += 1
    return n


# From this image side up, the defaults are the ones measured on photo-sized images.
PHOTO_SIDE = 64


def default_model_config(image_shape: Sequence[int], **overrides) -> ModelConfig:
    """Settings that suit the image size: stages until about 4x4 (8x8 from 64 px up), widths that
    grow with depth.

    `overrides` (None values are ignored) replace them; the chosen net may adjust the defaults
    for its own kind (``default_settings``), e.g. the sparse net's 1,600 filters.
    """
    h, w, c = image_shape
    smallest = min(h, w)
    stages = int(round(math.log2(max(smallest, 1) / 4))) if smallest >= 4 else 1
    base = 32 if c == 1 else 64
    if smallest >= PHOTO_SIDE:
        # Photo sizes: stages until about 8x8 and half the colour width. On a 96 px JPEG folder, 10
        # minutes' training on one CPU core: 32-256 channels in 4 stages 0.6075 validation accuracy,
        # 64-256 in 5 (the rule below 64 px) 0.5885, having seen 39,700 images against 12,800
        # (benchmarks/validate.py, RESULTS.md "Photo-sized defaults").
        stages, base = int(round(math.log2(smallest / 8))), 32
    stages = max(1, min(stages if smallest > 8 else 2, 5, max_stages((h, w))))
    channels = tuple(min(base * 2**i, 256) for i in range(stages))
    settings: dict[str, Any] = dict(in_channels=c, image_size=(h, w), channels=channels)
    given = {k: v for k, v in overrides.items() if v is not None}
    arch = given.get("arch", "conv")
    if arch not in ARCHITECTURES:
        net_class(arch)  # raises the error that lists them
    settings = net_class(arch).default_settings((h, w, c), settings, overrides)
    settings.update(given)
    return ModelConfig(**settings)


def code_size(config: ModelConfig) -> int:
    """Number of values in the bottleneck code."""
    return math.prod(net_class(config.arch).code_shape(config))
