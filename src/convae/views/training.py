"""Reconstructions beside originals, and training curves from history.csv."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .common import (
    ViewNotApplicable,
    show_image,
)


def reconstruction_figure(
    originals: np.ndarray, reconstructions: np.ndarray, title: str = "", show_error: bool = False
):
    """Originals (top row) above their reconstructions, each with its MSE and PSNR.

    With `show_error`, a third row shows the absolute error per pixel (mean over channels).
    """
    originals = originals.astype(np.float32) / 255 if originals.dtype == np.uint8 else originals
    n = len(originals)
    cols = min(n, 16)
    rows = int(np.ceil(n / cols))
    per = 3 if show_error else 2
    fig = Figure(figsize=(cols * 1.0 + 0.4, per * rows * 1.15 + 0.6))
    axes = fig.subplots(per * rows, cols, squeeze=False)
    mse = ((originals - reconstructions) ** 2).reshape(n, -1).mean(1)
    psnr = 10 * np.log10(1 / np.maximum(mse, 1e-10))
    error = np.abs(originals - reconstructions).mean(-1)
    vmax = max(float(error.max()), 1e-6)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        top, bottom = axes[per * r, c], axes[per * r + 1, c]
        for ax, img in ((top, originals[i]), (bottom, reconstructions[i])):
            ax.axis("on")
            show_image(ax, np.clip(img, 0, 1))
        bottom.set_xlabel(f"{psnr[i]:.1f} dB", fontsize=7)
        if show_error:
            ax = axes[per * r + 2, c]
            ax.axis("on")
            ax.imshow(error[i], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("original", fontsize=8)
    axes[1, 0].set_ylabel("recon", fontsize=8)
    if show_error:
        axes[2, 0].set_ylabel(f"|error|\n0-{vmax:.2f}", fontsize=7)
    fig.suptitle(f"{title}  MSE {mse.mean():.5f}  PSNR {psnr.mean():.2f} dB".strip(), fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(history: Sequence[dict], title: str = ""):
    """Training curves from history.csv: loss, PSNR, SSIM and learning rate by epoch."""
    if not history:
        raise ViewNotApplicable("training curves: the run has no history.csv rows (it has not finished an epoch)")
    nan = float("nan")
    keys = ("epoch", "step", "train_loss", "val_mse", "val_psnr", "val_ssim", "lr", "seconds")
    history = [{k: r.get(k, nan) for k in keys} for r in history]  # older runs may lack a column
    epoch = [r["epoch"] for r in history]
    marker = "o" if len(history) < 30 else None
    fig = Figure(figsize=(9, 6))
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    ax.plot(epoch, [r["train_loss"] for r in history], marker=marker, ms=3, label="train loss")
    ax.plot(epoch, [r["val_mse"] for r in history], marker=marker, ms=3, label="validation MSE")
    losses = np.array([r[k] for r in history for k in ("train_loss", "val_mse")], dtype=float)
    losses = losses[np.isfinite(losses) & (losses > 0)]
    if len(losses) and losses.max() / losses.min() > 10:  # log only where it spans a decade, else no tick is labelled
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("loss", fontsize=9)
    panels = (
        (axes[0, 1], "val_psnr", "validation PSNR (dB)"),
        (axes[1, 0], "val_ssim", "validation SSIM"),
        (axes[1, 1], "lr", "learning rate"),
    )
    for ax, key, name in panels:
        colour = "tab:purple" if key == "lr" else "tab:green"
        ax.plot(epoch, [r[key] for r in history], marker=marker, ms=3, color=colour)
        ax.set_title(name, fontsize=9)
    for ax in axes.flat:
        if len(epoch) <= 12:
            ax.set_xticks(epoch)
            ax.set_xlim(min(epoch) - 0.5, max(epoch) + 0.5)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    seconds = np.nansum([r["seconds"] for r in history])
    steps = history[-1]["step"]
    fig.suptitle(
        f"{title + ': ' if title else ''}{len(history)} epoch{'s' if len(history) > 1 else ''}, {'?' if steps != steps else int(steps)} steps, "
        f"{seconds:.1f} s of training",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
