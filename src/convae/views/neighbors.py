"""Similar images as a picture grid: each query, then its nearest index images with their
cosine similarity (green frame: same label as the query, red: another label)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .common import as_float, image_axes, rgb, scale_for, tile_mosaic, upscale

_SAME, _OTHER, _PLAIN = np.array([0.2, 0.65, 0.25]), np.array([0.85, 0.2, 0.2]), 0.55


def _tile(image: np.ndarray, factor: int) -> np.ndarray:
    return upscale(rgb(as_float(image)), factor)


def neighbors_figure(
    queries: np.ndarray,
    neighbours: np.ndarray,
    similarity: np.ndarray,
    *,
    query_names: Sequence[str],
    same: np.ndarray | None = None,
    title: str = "",
):
    """`queries` (Q, H, W, C), `neighbours` (Q, k, H, W, C) nearest first, `similarity` (Q, k);
    `same` (Q, k) bool: whether each neighbour shares its query's label (None: no labels)."""
    q, k = similarity.shape
    h, w = queries.shape[1:3]
    factor = scale_for(h, w, 48)
    tiles = []
    for i in range(q):
        tiles.append(_tile(queries[i], factor))
        tiles.extend(_tile(neighbours[i, j], factor) for j in range(k))
    gap = 12
    mosaic, corners = tile_mosaic(tiles, k + 1, pad=gap, frame=_PLAIN)  # gap: room for the similarities
    th, tw = h * factor, w * factor
    for i in range(q):  # a gap after each query, and each neighbour framed by whether its label matches
        for j in range(k):
            top, left = corners[i * (k + 1) + j + 1]
            colour = _PLAIN if same is None else (_SAME if same[i, j] else _OTHER)
            for d in (1, 2):
                mosaic[top - d, left - d : left + tw + d] = colour
                mosaic[top + th + d - 1, left - d : left + tw + d] = colour
                mosaic[top - d : top + th + d, left - d] = colour
                mosaic[top - d : top + th + d, left + tw + d - 1] = colour
    fig, ax = image_axes(mosaic, margins=(1.8, 0.3, 0.6, 0.2), min_width=6.0)
    ax.set_yticks([corners[i * (k + 1)][0] + th / 2 for i in range(q)])
    ax.set_yticklabels([_short(n) for n in query_names], fontsize=7)
    ax.tick_params(length=0)
    for i in range(q):
        for j in range(k):
            top, left = corners[i * (k + 1) + j + 1]
            ax.text(left + tw / 2, top + th + 2, f"{similarity[i, j]:.2f}", ha="center", va="top", fontsize=5)
    fig.text(0.02, 0.99, title or "query, then its nearest images (cosine similarity)", fontsize=8, va="top", ha="left")
    return fig


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1) :]
