"""The fully-connected baseline (arch "dense"): it flattens the image, so it loses spatial context.

Layers ``fc1`` ... ``fcN`` (the hidden widths) and ``bottleneck`` (the code), all vectors: every
unit sees the whole image, and there are no maps, sign splits or filters to show.
"""

from __future__ import annotations

import typing

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .base import AutoencoderNet, FeatureInfo, LayerInfo, TrainStep, reconstruction_loss
from .blocks import activation
from .config import ModelConfig


class DenseAutoencoderNet(AutoencoderNet):
    decoder: nn.Sequential

    description = "dense (fully-connected) autoencoder"
    size_options = ("--hidden", "--latent-dim")
    activation_options = ("--batch-size",)
    config_fields = ("hidden", "latent_dim", "norm", "activation")
    spatial = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, w = config.image_size
        self.shape = (config.in_channels, h, w)
        d = config.in_channels * h * w
        widths = [d, *config.hidden]
        self.encoder = nn.ModuleDict()
        for i in range(len(config.hidden)):
            layers: list[nn.Module] = [nn.Linear(widths[i], widths[i + 1])]
            if config.norm == "batch":
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            layers.append(activation(config.activation))
            self.encoder[f"fc{i + 1}"] = nn.Sequential(*layers)
        self.encoder["bottleneck"] = nn.Linear(widths[-1], config.latent_dim)
        dec = []
        back = [config.latent_dim, *reversed(config.hidden)]
        for i in range(len(config.hidden)):
            dec += [nn.Linear(back[i], back[i + 1]), activation(config.activation)]
        dec.append(nn.Linear(back[-1], d))
        self.decoder = nn.Sequential(*dec)
        self.feature_info = FeatureInfo(self._layer_info(name, m) for name, m in self.encoder.items())

    def _layer_info(self, name: str, module: nn.Module) -> LayerInfo:
        h, w = self.config.image_size
        linear = typing.cast(nn.Linear, module[0] if isinstance(module, nn.Sequential) else module)
        width = linear.out_features
        params = sum(p.numel() for p in module.parameters())
        return LayerInfo(name, width, None, max(h, w), (h - 1) / 2, (width,), params)

    # -- configuration -----------------------------------------------------
    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        if config.latent_dim < 1 or any(u < 1 for u in config.hidden):
            raise ConfigError("dense autoencoder: latent_dim and hidden widths must be positive")
        if config.code_wta:
            raise ConfigError("code_wta applies to the conv autoencoder; the dense baseline ignores it, so leave it 0")

    @classmethod
    def default_settings(cls, image_shape, settings: dict, overrides: dict) -> dict:
        if "latent_dim" in overrides:
            return settings
        # Comparable code size: the conv model's code, but never more than half the pixels.
        from .conv import ConvAutoencoderNet

        h, w, c = image_shape
        given = {k: v for k, v in overrides.items() if v is not None}
        conv = ModelConfig(**{**settings, **given, "arch": "conv"})
        code = int(np.prod(ConvAutoencoderNet.code_shape(conv)))
        return {**settings, "latent_dim": max(2, min(code, (h * w * c) // 2))}

    @classmethod
    def code_shape(cls, config: ModelConfig) -> tuple[int, ...]:
        return (config.latent_dim,)

    # -- layers ------------------------------------------------------------
    def receptive_box(self, layer: str, y: int = 0, x: int = 0) -> tuple[int, int, int, int]:
        """Every unit of a dense layer sees the whole image."""
        self.feature_info.get(layer)
        return 0, 0, self.config.image_size[0], self.config.image_size[1]

    # -- passes --------------------------------------------------------------
    def _intermediates(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        out = {}
        x = x.flatten(1)  # (N, C, H, W) -> (N, C*H*W)
        for name, module in self.encoder.items():
            x = module(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for module in self.encoder.values():
            x = module(x)
        return x

    def decode_logits(self, code: torch.Tensor, sizes=None) -> torch.Tensor:
        return self.decoder(code).view(-1, *self.shape)  # (N, D) -> (N, C, H, W)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(code))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_logits(self.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(x))

    def training_loss(self, x_in: torch.Tensor, target: torch.Tensor, step: TrainStep) -> torch.Tensor:
        return reconstruction_loss(self.forward_logits(x_in), target, step.loss)

    def first_layer_filters(self) -> tuple[np.ndarray, str]:
        """The first layer's weight rows as whole-image templates: the dense net has no filters."""
        first = next(iter(self.encoder.values()))
        linear = typing.cast(nn.Linear, first[0] if isinstance(first, nn.Sequential) else first)
        c, h, w = self.shape
        weights = linear.weight.detach().float().cpu().view(-1, c, h, w)  # rows as (C, H, W) images
        kind = f"weights of {self.layer_names[0]} as {h}x{w} templates\n(the dense model has no conv filters)"
        return weights.permute(0, 2, 3, 1).numpy(), kind
