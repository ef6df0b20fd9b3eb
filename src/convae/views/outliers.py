"""The images a model reconstructs worst, with their reconstructions and per-pixel error maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from ..metrics import mse_per_image
from ..tensors import device_of, iter_uint8_batches, to_float_nchw
from .common import show_image


@dataclass
class Outliers:
    """The `rows` of the worst-reconstructed images, worst first, their MSE, originals and
    reconstructions (float (n, H, W, C) in [0, 1])."""

    rows: np.ndarray
    mse: np.ndarray
    originals: np.ndarray
    reconstructions: np.ndarray

    @property
    def error_maps(self) -> np.ndarray:
        """(n, H, W) squared error per pixel, averaged over channels."""
        return ((self.originals - self.reconstructions) ** 2).mean(-1)


@torch.inference_mode()
def worst_reconstructed(model, images, count: int = 8, batch_size: int = 256) -> Outliers:
    """The `count` images of `images` with the largest reconstruction MSE, worst first."""
    device = device_of(model)
    mse = np.empty(len(images))
    for s, batch in enumerate(iter_uint8_batches(images, np.arange(len(images)), batch_size)):
        x = to_float_nchw(batch, device)
        mse[s * batch_size : s * batch_size + len(x)] = mse_per_image(model(x).float(), x).cpu().numpy()
    rows = np.argsort(-mse, kind="stable")[: min(count, len(images))]
    originals = np.asarray(images[rows])
    x = to_float_nchw(originals, device)
    recon = model(x).float().permute(0, 2, 3, 1).cpu().numpy()
    return Outliers(rows, mse[rows], originals.astype(np.float32) / 255, recon)


def outliers_figure(found: Outliers, names: Sequence[str], title: str = "") -> Figure:
    """Worst first, one column each: original, reconstruction, squared error per pixel (one
    colour scale for all, so columns compare), each named and with its MSE."""
    n = len(found.rows)
    fig = Figure(figsize=(max(n, 2) * 1.15 + 0.6, 3 * 1.2 + 0.9))
    axes = fig.subplots(3, max(n, 1), squeeze=False)
    errors = found.error_maps
    vmax = max(float(errors.max()) if n else 0.0, 1e-6)
    for j in range(n):
        show_image(axes[0, j], np.clip(found.originals[j], 0, 1))
        show_image(axes[1, j], np.clip(found.reconstructions[j], 0, 1))
        axes[2, j].imshow(errors[j], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        axes[2, j].set_xticks([])
        axes[2, j].set_yticks([])
        name = names[j] if len(names[j]) <= 16 else "\u2026" + names[j][-15:]
        axes[0, j].set_title(f"#{j + 1} {name}", fontsize=6)
        axes[2, j].set_xlabel(f"MSE {found.mse[j]:.4f}", fontsize=6)
    axes[0, 0].set_ylabel("original", fontsize=8)
    axes[1, 0].set_ylabel("recon", fontsize=8)
    axes[2, 0].set_ylabel(f"error\u00b2\n0-{vmax:.2f}", fontsize=7)
    fig.suptitle(title or "worst reconstructed first", fontsize=10)
    fig.tight_layout()
    return fig
