"""First-layer filters: edge, corner and colour-gradient detectors, strongest first."""

from __future__ import annotations

import numpy as np
from torch import nn

from .common import (
    colormap,
    image_axes,
    scale_for,
    tile_mosaic,
    upscale,
)


def first_layer_weights(model: nn.Module) -> tuple[np.ndarray, str]:
    """First-layer weights as images (N, h, w, C_in), strongest first, and what they are.

    What they are is the net's to say (``first_layer_filters``): conv kernels, a sparse net's
    dictionary patches, or the dense net's whole-image templates.
    """
    w, kind = model.first_layer_filters()  # (N, h, w, C_in)
    order = np.argsort(-np.sqrt((w**2).reshape(len(w), -1).sum(1)), kind="stable")
    return w[order], kind


def _filter_tile(w: np.ndarray) -> np.ndarray:
    """One (h, w, C) weight -> RGB: colour as is for 3 channels, blue-white-red otherwise."""
    m = float(np.abs(w).max()) or 1.0
    if w.shape[-1] == 3:
        return np.clip(w / (2 * m) + 0.5, 0, 1)  # zero is mid-gray; a colour gradient shows as colours
    return colormap(w.mean(-1), "RdBu_r", -m, m)


def filters_figure(model: nn.Module, max_filters: int = 64, title: str = ""):
    """The first layer's filters in a grid, strongest (largest norm) first."""
    weights, kind = first_layer_weights(model)
    weights = weights[:max_filters]
    scale = scale_for(*weights.shape[1:3], target=48)
    tiles = [upscale(_filter_tile(w), scale) for w in weights]
    cols = min(16, len(tiles)) if model.spatial else min(8, len(tiles))
    mosaic, _ = tile_mosaic(tiles, cols)
    fig, ax = image_axes(mosaic, margins=(0.3, 0.3, 0.6, 0.15), min_width=5.0)
    colour = "RGB, mid-gray = 0" if weights.shape[-1] == 3 else "red = positive, blue = negative weight"
    fig.suptitle(f"{title + ': ' if title else ''}first layer, {len(weights)} strongest {kind}\n({colour})", fontsize=9)
    return fig
