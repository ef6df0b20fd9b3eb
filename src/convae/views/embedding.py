"""The bottleneck codes in 2-D: PCA and t-SNE."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..errors import ConfigError
from ..progress import make_bar
from ..tensors import device_of, to_float_nchw
from .common import (
    ViewNotApplicable,
    check_images,
    image_batches,
    sample_indices,
)


@torch.inference_mode()
def layer_features(
    model: nn.Module, images, layer: str = "bottleneck", batch_size: int = 256, progress: bool = False
) -> np.ndarray:
    """One flattened row of `layer`'s activations per image."""
    check_images(model, images)
    device = device_of(model)
    out = None
    bar = make_bar(progress, len(images), desc="features", leave=False)
    try:
        for start, batch in image_batches(images, np.arange(len(images)), batch_size):
            a = (
                model.forward_intermediates(to_float_nchw(batch, device), [layer])[layer]
                .flatten(1)
                .float()
                .cpu()
                .numpy()
            )
            if out is None:
                out = np.empty((len(images), a.shape[1]), dtype=np.float32)
            out[start : start + len(a)] = a
            bar.update(len(a))
    finally:
        bar.close()
    return out


def embed(
    features: np.ndarray, method: str = "pca", *, max_points: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of (at most `max_points`, sampled with `seed`) rows, and which rows they are.

    t-SNE runs on the first 50 principal components, the usual denoising and speed-up.
    """
    from sklearn.decomposition import PCA

    rows = sample_indices(len(features), max_points, seed)
    x = np.asarray(features[rows], dtype=np.float64)
    x = x - x.mean(0)
    if method == "pca":
        n = min(2, *x.shape)
        coords = PCA(n_components=n, random_state=seed).fit_transform(x) if n else np.zeros((len(x), 0))
        if coords.shape[1] < 2:  # one image or one feature: pad, so the plot still has two axes
            coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        return coords, rows
    if method == "tsne":
        from sklearn.manifold import TSNE

        if len(x) < 5:
            raise ViewNotApplicable(f"t-SNE needs at least 5 images, got {len(x)}")
        d = min(50, x.shape[0], x.shape[1])
        if d < x.shape[1]:
            x = PCA(n_components=d, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=750)
        return tsne.fit_transform(x.astype(np.float32)), rows
    raise ConfigError(f"embedding method {method!r}: use pca or tsne")


def embedding_figure(
    embeddings: dict[str, np.ndarray],
    labels: np.ndarray | None,
    classes: Sequence[str] | None = None,
    title: str = "",
    notes: dict[str, str] | None = None,
):
    """Scatter plots of 2-D embeddings (name -> (n, 2)), coloured by label when there are labels."""
    notes = notes or {}
    names = list(embeddings) + [n for n in notes if n not in embeddings]
    width = 5.2 * len(names) + (1.6 if labels is not None else 0)  # room for the legend
    fig = Figure(figsize=(width, 5))
    axes = fig.subplots(1, len(names), squeeze=False)
    handles = None
    for ax, name in zip(axes[0], names):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=10)
        if name not in embeddings:
            ax.text(0.5, 0.5, notes[name], ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
            continue
        xy = embeddings[name]
        size = float(np.clip(12000 / len(xy), 4, 24))
        if labels is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c="tab:blue", alpha=0.6, linewidths=0)
            continue
        values = np.unique(labels)
        cmap = matplotlib.colormaps["tab10" if len(values) <= 10 else "tab20"]
        handles = []
        for j, v in enumerate(values):
            sel = labels == v
            name_v = classes[int(v)] if classes is not None and 0 <= int(v) < len(classes) else str(v)
            handles.append(
                ax.scatter(
                    xy[sel, 0], xy[sel, 1], s=size, color=cmap(j % cmap.N), alpha=0.7, linewidths=0, label=name_v
                )
            )
    if handles and len(handles) <= 20:
        scale = max(1, 6 / max(1, handles[0].get_sizes()[0]) ** 0.5)  # legend dots readable however small the points
        fig.legend(handles=handles, loc="center right", fontsize=8, markerscale=scale, frameon=False)
    note = "coloured by label" if labels is not None else "no labels: points are not coloured"
    fig.suptitle(f"{title + ': ' if title else ''}bottleneck codes in 2-D ({note})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86 if handles else 1, 0.95))
    return fig
