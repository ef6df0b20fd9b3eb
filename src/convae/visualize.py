"""Views of a trained autoencoder, as matplotlib figures (the CLI saves them as PNG)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are saved, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ._io import atomic_path  # noqa: E402


def _show(ax, image: np.ndarray) -> None:
    """Draw an (H, W, C) image in [0, 1] or uint8."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1 if image.dtype != np.uint8 else 255)
    else:
        ax.imshow(image[..., :3])
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_figure(originals: np.ndarray, reconstructions: np.ndarray, title: str = ""):
    """Originals (top row) above their reconstructions, each with its MSE and PSNR."""
    originals = originals.astype(np.float32) / 255 if originals.dtype == np.uint8 else originals
    n = len(originals)
    cols = min(n, 16)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(2 * rows, cols, figsize=(cols * 1.0 + 0.4, 2 * rows * 1.15 + 0.6), squeeze=False)
    mse = ((originals - reconstructions) ** 2).reshape(n, -1).mean(1)
    psnr = 10 * np.log10(1 / np.maximum(mse, 1e-10))
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        for ax, img in ((top, originals[i]), (bottom, reconstructions[i])):
            ax.axis("on")
            _show(ax, np.clip(img, 0, 1))
        bottom.set_xlabel(f"{psnr[i]:.1f} dB", fontsize=7)
    axes[0, 0].set_ylabel("original", fontsize=8)
    axes[1, 0].set_ylabel("recon", fontsize=8)
    fig.suptitle(f"{title}  MSE {mse.mean():.5f}  PSNR {psnr.mean():.2f} dB".strip(), fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save as PNG atomically, then close the figure."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
