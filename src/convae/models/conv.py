"""The convolutional autoencoder (arch "conv").

Encoder: stages of `convs_per_stage` conv blocks followed by a 2x downsampling, then a
bottleneck; the decoder mirrors it. Layers, in network order:

    stage1.conv1 ... stage1.convN   (C1, H, W)          conv blocks: conv -> norm -> activation
    stage1                          (C1, H/2, W/2)      the stage's downsampled output
    ...
    bottleneck                      (C, h, w) or (D,)   the code (a 1x1 conv, a dense layer, or
                                                        the last stage's maps as they are)

Each conv block also offers its sign-split maps (``stage1.conv1.split``, see
:func:`~convae.models.blocks.sign_split`). Sizes round up at every stage, so any image size
the depth allows works, and the decoder is told each encoder stage's size.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import SPLIT_SUFFIX, AutoencoderNet, FeatureInfo, LayerInfo, TrainStep, reconstruction_loss
from .blocks import ConvBlock, activation, sign_split, winner_take_all
from .config import ModelConfig, max_stages, stage_sizes


class EncoderStage(nn.Module):
    """conv1..convN, then 2x downsampling (`pool` or a strided `down` conv)."""

    pool: nn.Module

    def __init__(self, cin: int, cout: int, config: ModelConfig):
        super().__init__()
        self.conv_names = [f"conv{j}" for j in range(1, config.convs_per_stage + 1)]
        for j, name in enumerate(self.conv_names):
            self.add_module(name, ConvBlock(cin if j == 0 else cout, cout, config))
        if config.downsample == "max":
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
        elif config.downsample == "avg":
            self.pool = nn.AvgPool2d(2, ceil_mode=True)
        else:
            self.pool = ConvBlock(cout, cout, config, stride=2)

    def blocks(self) -> list[tuple[str, ConvBlock]]:
        """(name, block) of its conv blocks, in order."""
        return [(name, typing.cast(ConvBlock, getattr(self, name))) for name in self.conv_names]


class DecoderStage(nn.Module):
    """Upsample to the mirrored encoder stage's input size, then convs ("light": convs, then upsample)."""

    def __init__(self, cin: int, cout: int, config: ModelConfig):
        super().__init__()
        self.mode = config.upsample
        self.convs_first = config.decoder == "light"
        up_channels = cout if self.convs_first else cin
        self.up = nn.ConvTranspose2d(up_channels, up_channels, 2, stride=2) if self.mode == "transpose" else None
        self.convs = nn.Sequential(
            *[ConvBlock(cin if j == 0 else cout, cout, config) for j in range(config.convs_per_stage)]
        )

    def upsample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.up is not None:
            return self.up(x)[..., : size[0], : size[1]]  # (N, C, 2h, 2w) cropped to the encoder's size
        align = False if self.mode == "bilinear" else None
        return F.interpolate(x, size=size, mode=self.mode, align_corners=align)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.convs_first:
            return self.upsample(self.convs(x), size)  # (N, cout, h, w) -> (N, cout, size)
        return self.convs(self.upsample(x, size))


class ConvAutoencoderNet(AutoencoderNet):
    to_code: nn.Module
    from_code: nn.Module

    description = "convolutional autoencoder"
    size_options = ("--widths", "--latent-dim", "--latent-channels")
    config_fields = (
        "channels", "convs_per_stage", "kernel_size", "norm", "activation", "downsample", "upsample", "decoder",
        "bottleneck", "latent_channels", "latent_dim", "code_wta",
    )  # fmt: skip
    channels_last = True  # oneDNN's convolutions are faster on NHWC tensors

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "conv":
            raise ConfigError(f"ConvAutoencoderNet needs arch='conv', got {config.arch!r}")
        self.config = config
        chs = config.channels
        self.encoder = nn.ModuleDict()
        for i, cout in enumerate(chs):
            cin = config.in_channels if i == 0 else chs[i - 1]
            self.encoder[f"stage{i + 1}"] = EncoderStage(cin, cout, config)
        self.to_code, self.from_code = self._code_layers(config)
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(chs))):
            cout = chs[i - 1] if i > 0 else chs[0]
            self.decoder.append(DecoderStage(chs[i], cout, config))
        self.head = nn.Conv2d(chs[0], config.in_channels, 3, padding=1)
        self.feature_info = FeatureInfo(self._layer_infos(), split_of=self._block_names())

    @staticmethod
    def _code_layers(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
        """(to the code, back from it): dense, a 1x1 conv to latent_channels, or nothing."""
        chs = config.channels
        last_h, last_w = stage_sizes(config.image_size, len(chs))[-1]
        if config.bottleneck == "dense":
            flat = chs[-1] * last_h * last_w
            to_code = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.latent_dim))
            from_code = nn.Sequential(
                nn.Linear(config.latent_dim, flat),
                activation(config.activation),
                nn.Unflatten(1, (chs[-1], last_h, last_w)),
            )
            return to_code, from_code
        if config.latent_channels:
            to_latent = nn.Conv2d(chs[-1], config.latent_channels, 1)
            back = nn.Sequential(nn.Conv2d(config.latent_channels, chs[-1], 1), activation(config.activation))
            return to_latent, back
        return nn.Identity(), nn.Identity()

    # -- configuration -----------------------------------------------------
    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        h, w = config.image_size
        if not config.channels:
            raise ConfigError("channels: give at least one stage width, e.g. 32,64,128")
        if any(c < 1 for c in config.channels):
            raise ConfigError(f"channels must be positive, got {list(config.channels)}")
        if config.convs_per_stage < 1:
            raise ConfigError(f"convs_per_stage must be at least 1, got {config.convs_per_stage}")
        if config.kernel_size < 1 or config.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (same padding), got {config.kernel_size}")
        if not 0 <= config.code_wta <= 1:
            raise ConfigError(f"code_wta must be a fraction in [0, 1], got {config.code_wta}")
        if config.latent_channels < 0 or config.latent_dim < 1:
            raise ConfigError("latent_channels must be >= 0 and latent_dim >= 1")
        for i, (sh, sw) in enumerate(stage_sizes(config.image_size, len(config.channels))[:-1], start=1):
            if sh < 2 or sw < 2:
                usable = max_stages(config.image_size)
                if usable == 0:
                    raise ConfigError(
                        f"images of {h}x{w} pixels are too small for a convolutional autoencoder (it needs "
                        "at least 2x2): use larger images, or resize them (--image-size 28)"
                    )
                raise ConfigError(
                    f"image size {h}x{w} is too small for {len(config.channels)} stages "
                    f"(stage {i} would get {sh}x{sw}; each stage halves the size): "
                    f"use at most {usable} stage(s) or larger images"
                )

    @classmethod
    def fields_used(cls, config: ModelConfig) -> tuple[str, ...]:
        return tuple(f for f in cls.config_fields if f != "latent_dim" or config.bottleneck == "dense")

    @classmethod
    def code_shape(cls, config: ModelConfig) -> tuple[int, ...]:
        if config.bottleneck == "dense":
            return (config.latent_dim,)
        h, w = stage_sizes(config.image_size, len(config.channels))[-1]
        return (config.latent_channels or config.channels[-1], h, w)

    # -- layer bookkeeping -------------------------------------------------
    def stages(self) -> list[tuple[str, EncoderStage]]:
        return [(name, typing.cast(EncoderStage, stage)) for name, stage in self.encoder.items()]

    def _layer_sequence(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) in forward order; a stage's name is its pooled output."""
        for stage_name, stage in self.stages():
            for conv_name, block in stage.blocks():
                yield f"{stage_name}.{conv_name}", block
            yield stage_name, stage.pool
        yield "bottleneck", self.to_code

    def _block_names(self) -> list[str]:
        return [name for name, _ in self._layer_sequence() if "." in name]

    def _layer_infos(self) -> list[LayerInfo]:
        cfg = self.config
        rf, jump, start = 1, 1, 0.0  # receptive field, stride, centre of unit 0 (input pixels)
        h, w = cfg.image_size
        infos: list[LayerInfo] = []
        for name, module in self._layer_sequence():
            if name == "bottleneck":
                if cfg.bottleneck == "dense":
                    rf, start = max(cfg.image_size), (cfg.image_size[0] - 1) / 2
                shape = self.code_shape(cfg)
            elif "." in name:  # a same-padded conv
                rf += (cfg.kernel_size - 1) * jump
                shape = (typing.cast(ConvBlock, module).conv.out_channels, h, w)
            else:  # the stage's 2x downsampling
                rf, start = (rf + 2 * jump, start) if cfg.downsample == "stride" else (rf + jump, start + jump / 2)
                jump *= 2
                h, w = math.ceil(h / 2), math.ceil(w / 2)
                shape = (infos[-1].num_chs, h, w)
            params = sum(p.numel() for p in module.parameters())
            infos.append(LayerInfo(name, shape[0], jump, rf, start, tuple(shape), params))
        return infos

    def hierarchy_layers(self) -> list[str]:
        """Every stage's output and the bottleneck; when the bottleneck is the last stage's maps as
        they are (no latent layer), that stage is left out: it would repeat the bottleneck."""
        infos = [f for f in self.feature_info if "." not in f.module]
        last, code = infos[-2:]
        if code.params == 0 and code.shape == last.shape:
            infos.remove(last)
        return [f.module for f in infos]

    # -- forward passes ----------------------------------------------------
    def _intermediates(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, module in self._layer_sequence():
            split = name + SPLIT_SUFFIX
            if split in wanted:
                conv, norm, act = typing.cast(ConvBlock, module).parts()
                z = norm(conv(x))
                out[split] = sign_split(z)  # (N, C, H, W) -> (N, 2C, H, W)
                if len(out) == len(wanted):
                    break
                x = act(z)
            else:
                x = module(x)  # stage pools: (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2))
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        sizes = []
        for _, stage in self.stages():
            sizes.append((x.shape[-2], x.shape[-1]))
            for _, block in stage.blocks():
                x = block(x)
            x = stage.pool(x)
        return self.to_code(x), sizes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[0]

    def decode_logits(self, code: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        if sizes is None:
            sizes = stage_sizes(self.config.image_size, len(self.config.channels))[:-1]
        x = self.from_code(code)
        for stage, size in zip(self.decoder, reversed(sizes)):
            x = stage(x, size)  # (N, C_i, h, w) -> (N, C_{i-1}, H_i, W_i): the mirrored input size
        return self.head(x)  # (N, in_channels, H, W)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(code))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        code, sizes = self._encode(x)
        if self.config.code_wta:
            code = winner_take_all(code, self.config.code_wta)
        return self.decode_logits(code, sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1], the input's exact shape."""
        return torch.sigmoid(self.forward_logits(x))

    def training_loss(self, x_in: torch.Tensor, target: torch.Tensor, step: TrainStep) -> torch.Tensor:
        return reconstruction_loss(self.forward_logits(x_in), target, step.loss)

    def first_layer_filters(self) -> tuple[np.ndarray, str]:
        w = self.stages()[0][1].blocks()[0][1].conv.weight.detach().float().cpu()  # (C_out, C_in, k, k)
        return w.permute(0, 2, 3, 1).numpy(), f"{w.shape[-2]}x{w.shape[-1]} kernels of stage1.conv1"
