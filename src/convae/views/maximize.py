"""Activation maximization: the input each channel prefers, by regularized gradient ascent."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..tensors import device_of
from .common import (
    image_axes,
    image_shape,
    rgb,
    scale_for,
    tile_mosaic,
    upscale,
)


@dataclass
class Maximized:
    layer: str
    channels: list[int]
    images: np.ndarray  # (n, H, W, C) float in [0, 1], one per channel
    start: np.ndarray  # each channel's mean activation on the starting image
    final: np.ndarray  # ... on the synthesized image (no jitter)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # rows, then columns: separable
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _channel_activation(model, x, layer, channels):
    a = model.forward_intermediates(x, [layer])[layer]
    sel = a[torch.arange(len(channels), device=a.device), torch.as_tensor(channels, device=a.device)]
    return sel.flatten(1).mean(1) if sel.ndim > 1 else sel  # a map's mean, or the unit itself


class _LeakyGradient:
    """While active, ReLUs pass a tenth of the gradient where they are off (values unchanged).

    A channel that is zero on the starting image would otherwise get no gradient and stay dead.
    """

    def __init__(self, model: nn.Module):
        self.relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        self.handles, self.inplace = [], []

    @staticmethod
    def _hook(module, inputs, output):
        neg = inputs[0].clamp(max=0)
        return output + 0.1 * (neg - neg.detach())

    def __enter__(self):
        for m in self.relus:
            self.inplace.append(m.inplace)
            m.inplace = False  # the hook needs the input as it was
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m, flag in zip(self.relus, self.inplace):
            m.inplace = flag


def maximize_activation(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    *,
    steps: int = 128,
    lr: float = 0.08,
    jitter: int | None = None,
    blur_every: int = 4,
    blur_sigma: float = 0.6,
    tv_weight: float = 0.2,
    l2_weight: float = 1.0,
    seed: int = 0,
) -> Maximized:
    """Synthesize, for each channel, the input that drives its mean activation up.

    Regularized gradient ascent on the image, kept in [0, 1] through a sigmoid and started at
    mid-gray with a little noise: random jitter each step, a Gaussian blur every `blur_every`
    steps, a total-variation penalty and an L2 pull towards gray keep the pattern smooth and
    bounded instead of adversarial noise or saturation. The objective is the channel's mean over
    its map (the pattern it prefers, wherever it is; the unit itself for vector layers). ReLUs
    leak a little gradient meanwhile, so a channel silent on gray still finds its way up. The
    model is left untouched.
    """
    info = model.layer_info(layer)
    channels = [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < info["num_chs"]]
    if bad:
        raise ConfigError(f"{layer} has {info['num_chs']} channels; channel(s) {bad} do not exist")
    if not channels:
        raise ConfigError("maximize: give at least one channel")
    if steps < 1:
        raise ConfigError(f"maximize steps must be at least 1, got {steps}")
    h, w, c = image_shape(model)
    jitter = max(1, round(min(h, w) / 16)) if jitter is None else jitter
    device = device_of(model)
    gen = torch.Generator().manual_seed(seed)
    z = (0.1 * torch.randn((len(channels), c, h, w), generator=gen)).to(device).requires_grad_(True)
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            start = _channel_activation(model, torch.sigmoid(z), layer, channels)
        opt = torch.optim.Adam([z], lr=lr)
        with _LeakyGradient(model):
            for step in range(steps):
                x = torch.sigmoid(z)
                if jitter:
                    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                    x = torch.roll(x, (dy, dx), (2, 3))
                act = _channel_activation(model, x, layer, channels)
                tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
                tv = tv + (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))
                l2 = (x - 0.5).pow(2).mean((1, 2, 3))
                loss = (-act + tv_weight * tv + l2_weight * l2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if blur_every and (step + 1) % blur_every == 0 and step < steps - 1:
                    with torch.no_grad():
                        z.copy_(_gaussian_blur(z, blur_sigma))
        with torch.no_grad():
            x = torch.sigmoid(z)
            final = _channel_activation(model, x, layer, channels)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return Maximized(
        layer=layer,
        channels=channels,
        images=x.permute(0, 2, 3, 1).cpu().numpy(),
        start=start.cpu().numpy(),
        final=final.cpu().numpy(),
    )


def maximize_figure(model: nn.Module, results: Sequence[Maximized], title: str = ""):
    """A row per layer: the synthesized input of each chosen channel."""
    h, w, _ = image_shape(model)
    scale = scale_for(h, w, target=64)
    cols = max(len(r.channels) for r in results)
    tiles = []
    for r in results:
        tiles += [upscale(rgb(np.clip(img, 0, 1)), scale) for img in r.images]
        tiles += [None] * (cols - len(r.channels))
    mosaic, corners = tile_mosaic(tiles, cols, pad=16)
    th = h * scale
    fig, ax = image_axes(mosaic, margins=(1.3, 0.2, 0.55, 0.1), min_width=5.0)
    ax.set_yticks([corners[row * cols][0] + th / 2 for row in range(len(results))])
    ax.tick_params(length=0)
    ax.set_yticklabels([f"{r.layer}\nRF {model.layer_info(r.layer)['receptive_field']}" for r in results], fontsize=7)
    i = 0
    for r in results:
        for ch, fin in zip(r.channels, r.final):
            top, left = corners[i]
            ax.text(left + w * scale / 2, top + th + 1, f"ch {ch}  ({fin:.2g})", ha="center", va="top", fontsize=6)
            i += 1
        i += cols - len(r.channels)
    fig.suptitle(
        f"{title + ': ' if title else ''}activation maximization: the input each channel prefers\n"
        "(gradient ascent from gray with jitter, blur, TV and L2 penalties; the channel's mean activation in brackets)",
        fontsize=9,
    )
    return fig
