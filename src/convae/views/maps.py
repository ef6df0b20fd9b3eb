"""Feature maps of chosen images at every depth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..tensors import device_of, to_float_nchw
from .common import (
    ViewNotApplicable,
    as_float,
    colormap,
    image_axes,
    image_shape,
    rgb,
    scale_for,
    tile_mosaic,
    upscale,
    view_layers,
)


@torch.inference_mode()
def feature_maps(model: nn.Module, images, layers: Sequence[str]) -> dict[str, np.ndarray]:
    """Maps (N, C, h, w) of each layer for uint8 images (N, H, W, C)."""
    out = model.forward_intermediates(to_float_nchw(np.asarray(images), device_of(model)), list(layers))
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def feature_maps_figure(model: nn.Module, images, layers=None, channels: int = 8, title: str = ""):
    """For each image: its maps at every encoder depth (rows), the most variable channels (columns)."""
    if not model.spatial:
        raise ViewNotApplicable(
            "feature maps: the dense autoencoder's layers are vectors, not maps (it flattens the image "
            "first); the patches and maximize views show what its units respond to"
        )
    layers = view_layers(model, layers, lambda m: m.layer_names)
    images = np.asarray(images)
    maps = feature_maps(model, images, layers)
    h, w, _ = image_shape(model)
    scale = scale_for(h, w, target=56)
    # The same channels for every image, so columns compare: the most variable over the images shown.
    chosen = {}
    for layer in layers:
        m = maps[layer]
        chosen[layer] = np.argsort(-m.transpose(1, 0, 2, 3).reshape(m.shape[1], -1).var(1), kind="stable")[:channels]
    labels = ["input"]
    for layer in layers:
        info = model.layer_info(layer)
        labels.append(f"{layer}\n{info['shape'][1]}x{info['shape'][2]}, RF {info['receptive_field']}")
    mosaics = []
    for i, image in enumerate(images):
        tiles = [upscale(rgb(as_float(image)), scale)] + [None] * (channels - 1)
        for layer in layers:
            m = maps[layer][i]  # (C, h_l, w_l)
            fh, fw = m.shape[1:]
            rows, cols = np.arange(h) * fh // h, np.arange(w) * fw // w  # nearest, back to the input's size
            for c in chosen[layer]:
                lo, hi = float(m[c].min()), float(m[c].max())
                tiles.append(upscale(colormap(m[c][rows][:, cols], "magma", lo, hi), scale))
            tiles += [None] * (channels - len(chosen[layer]))
        mosaics.append(tile_mosaic(tiles, channels))
    th = h * scale
    gap = np.ones((mosaics[0][0].shape[0], 24, 3), dtype=np.float32)
    full = mosaics[0][0]
    for m, _ in mosaics[1:]:
        full = np.concatenate([full, gap, m], axis=1)
    fig, ax = image_axes(full, margins=(1.4, 0.2, 0.7, 0.1))
    corners = mosaics[0][1]
    ax.set_yticks([corners[r * channels][0] + th / 2 for r in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.tick_params(length=0)
    fig.suptitle(
        f"{title + ': ' if title else ''}feature maps of {len(images)} image(s) by depth, "
        f"the {channels} most variable channels per layer\n"
        "(each map scaled to its own range, magma: dark low, bright high)",
        fontsize=9,
    )
    return fig
