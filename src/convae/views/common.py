"""What the views share: drawing helpers, image sampling and checks, saving figures.

Images are drawn as mosaics (one ``imshow`` per panel, tiles upscaled with nearest-neighbour
by whole factors), so small inputs such as 8x8 digits stay sharp and large grids stay fast.
Figures are ``matplotlib.figure.Figure`` objects made without pyplot: convae never changes the
backend or the figure registry of the process it runs in, and saving picks the PNG canvas.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from torch import nn

from .._io import atomic_path
from ..errors import ConfigError, ConvaeError
from ..features.plan import resolve_layers

OUTSIDE = np.array([0.80, 0.84, 0.90])  # patch canvas outside the image: a pale blue no image pixel uses
_TILE_PX = 40  # tiles are upscaled to about this many pixels on their longer side


class ViewNotApplicable(ConvaeError):
    """A view that does not apply to this model or data; the message says why."""


def show_image(ax, image: np.ndarray) -> None:
    """Draw an (H, W, C) image in [0, 1] or uint8."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1 if image.dtype != np.uint8 else 255)
    else:
        ax.imshow(image[..., :3])
    ax.set_xticks([])
    ax.set_yticks([])


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    h, w = model.config.image_size
    return int(h), int(w), int(model.config.in_channels)


def rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> (H, W, 3); grayscale repeated, other channel counts averaged."""
    c = image.shape[-1]
    if c == 3:
        return image
    if c == 1:
        return np.repeat(image, 3, axis=-1)
    return np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)


def as_float(images) -> np.ndarray:
    images = np.asarray(images)
    return images.astype(np.float32) / 255 if images.dtype == np.uint8 else images.astype(np.float32)


def colormap(values: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) values -> (H, W, 3) RGB through a matplotlib colormap."""
    scale = vmax - vmin if vmax > vmin else 1.0
    return matplotlib.colormaps[cmap](np.clip((values - vmin) / scale, 0, 1))[..., :3]


def upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    return tile.repeat(factor, 0).repeat(factor, 1) if factor > 1 else tile


def scale_for(h: int, w: int, target: int = _TILE_PX) -> int:
    return max(1, round(target / max(h, w)))


def tile_mosaic(
    tiles: Sequence[np.ndarray | None], cols: int, pad: int = 4, bg: float = 1.0, frame: float | None = 0.55
):
    """Tiles (h, w, 3) of one size in a grid with `pad` pixels between; None leaves a blank cell.

    `frame`: the gray of a 1-pixel line around each tile, so white tiles stay apart on white.
    Returns the (H, W, 3) mosaic and the (top, left) of every cell.
    """
    first = next(t for t in tiles if t is not None)
    th, tw = first.shape[:2]
    rows = max(1, math.ceil(len(tiles) / cols))
    out = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), bg, dtype=np.float32)
    corners = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = pad + r * (th + pad), pad + c * (tw + pad)
        corners.append((top, left))
        if tile is None:
            continue
        if frame is not None:
            out[top - 1 : top + th + 1, left - 1 : left + tw + 1] = frame
        out[top : top + th, left : left + tw] = tile
    return out, corners


def image_axes(mosaic: np.ndarray, dpi: int = 100, margins=(1.6, 0.3, 0.6, 0.3), min_width: float = 3.0):
    """A figure that shows `mosaic` at about one screen pixel per mosaic pixel.

    margins: (left, right, top, bottom) in inches, for labels and the title.
    """
    h, w = mosaic.shape[:2]
    left, right, top, bottom = margins
    fw = max(w / dpi + left + right, min_width)
    fh = h / dpi + top + bottom
    fig = Figure(figsize=(fw, fh), dpi=dpi)
    ax = fig.add_axes([left / fw, bottom / fh, (w / dpi) / fw, (h / dpi) / fh])
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig, ax


def stacked_figure(blocks, title: str, dpi: int = 100, left: float = 0.9, width_min: float = 6.3):
    """Mosaics stacked vertically, each at one screen pixel per mosaic pixel under its own header.

    blocks: (header, mosaic, ytick positions, ytick labels). Returns the figure and its axes.
    """
    head, gap, top_in = 0.28, 0.12, 0.2 + 0.17 * (title.count("\n") + 1)
    width = max(max(b[1].shape[1] for b in blocks) / dpi + left + 0.2, width_min)
    height = top_in + sum(head + b[1].shape[0] / dpi + gap for b in blocks)
    fig = Figure(figsize=(width, height), dpi=dpi)
    y = height - top_in
    axes = []
    for header, mosaic, ticks, labels in blocks:
        mh, mw = mosaic.shape[0] / dpi, mosaic.shape[1] / dpi
        fig.text(0.1 / width, (y - head / 2) / height, header, fontsize=8, va="center", ha="left")
        y -= head + mh
        ax = fig.add_axes([left / width, y / height, mw / width, mh / height])
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        axes.append(ax)
        y -= gap
    fig.text(0.1 / width, 1 - (top_in / 2) / height, title, fontsize=9, va="center", ha="left")
    return fig, axes


def sample_indices(n: int, max_images: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_images` of `n` images, drawn with a fixed seed (all when None or 0)."""
    if max_images is not None and max_images < 0:
        raise ConfigError(f"max_images must be positive, got {max_images}")
    if not max_images or n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))


def image_batches(images, indices: np.ndarray, batch_size: int):
    for s in range(0, len(indices), batch_size):
        idx = indices[s : s + batch_size]
        yield s, np.asarray(images[idx])


def check_images(model: nn.Module, images, what: str = "data") -> None:
    """The images must have the model's (H, W, C)."""
    shape = tuple(int(s) for s in images.shape[1:])
    want = image_shape(model)
    if shape != want:
        raise ConfigError(
            f"{what}: images are {'x'.join(map(str, shape))} (HxWxC) but the model takes "
            f"{'x'.join(map(str, want))}; load them at that size (--image-size, --channels)"
        )
    if len(images) == 0:
        raise ConfigError(f"{what}: no images")


def hierarchy_layers(model: nn.Module) -> list[str]:
    """One layer per depth (the net's ``hierarchy_layers``)."""
    return model.hierarchy_layers()


def patch_layers(model: nn.Module) -> list[str]:
    """The first conv layer (edges, colour) and then one layer per depth."""
    layers = hierarchy_layers(model)
    if model.spatial and model.layer_names[0] not in layers:
        layers = [model.layer_names[0], *layers]
    return layers


def view_layers(model: nn.Module, layers: str | Sequence[str] | None, default) -> list[str]:
    """Layer names from "a,b", a list, "all" or None (`default(model)`), in network order."""
    shown = layers if isinstance(layers, str) or layers is None else ",".join(layers)
    return resolve_layers(model, layers, default=lambda: default(model), option=f"--layers {shown}")


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save `fig` as a PNG at `path`, atomically (a temporary file renamed into place); returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for inlining into HTML)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()
