"""Between two images: points on the line between their codes, decoded, beside the pixel-space
blend of the same two images: what the code space holds between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from ..tensors import device_of, to_float_nchw
from .common import show_image


@dataclass
class Interpolation:
    """`t` (steps,), the decoded codes and the pixel blends, float (steps, H, W, C) in [0, 1]."""

    t: np.ndarray
    decoded: np.ndarray
    blended: np.ndarray


@torch.inference_mode()
def interpolate_codes(model, a: np.ndarray, b: np.ndarray, steps: int = 8) -> Interpolation:
    """Decode (1 - t) code(a) + t code(b) for `steps` values of t from 0 to 1 (uint8 images (H, W, C))."""
    t = np.linspace(0.0, 1.0, max(2, steps))
    x = to_float_nchw(np.stack([a, b]), device_of(model))
    codes = model.encode(x)
    weights = torch.as_tensor(t, dtype=codes.dtype, device=codes.device).view(-1, *([1] * (codes.ndim - 1)))
    mixed = (1 - weights) * codes[:1] + weights * codes[1:]
    decoded = model.decode(mixed).float().permute(0, 2, 3, 1).cpu().numpy()
    pa, pb = (np.asarray(v, dtype=np.float32) / 255 for v in (a, b))
    blended = np.stack([(1 - s) * pa + s * pb for s in t])
    return Interpolation(t, decoded, blended)


def interpolation_figure(found: Interpolation, names: tuple[str, str], title: str = "") -> Figure:
    """Two rows over t: the decoded codes, then the pixel blends (t = 0 and 1: the two images)."""
    n = len(found.t)
    fig = Figure(figsize=(n * 1.1 + 0.8, 2 * 1.2 + 0.9))
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        show_image(axes[0, j], np.clip(found.decoded[j], 0, 1))
        show_image(axes[1, j], np.clip(found.blended[j], 0, 1))
        axes[1, j].set_xlabel(f"t={found.t[j]:.2f}", fontsize=7)
    axes[0, 0].set_ylabel("code space", fontsize=8)
    axes[1, 0].set_ylabel("pixel blend", fontsize=8)
    fig.suptitle(title or f"{names[0]} \u2192 {names[1]}", fontsize=9)
    fig.tight_layout()
    return fig
