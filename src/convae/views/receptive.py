"""Receptive-field growth by depth."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from torch import nn

from .common import (
    ViewNotApplicable,
    hierarchy_layers,
    image_shape,
    show_image,
)


def receptive_field_table(model: nn.Module) -> list[dict]:
    """Per encoder layer: stride, receptive field and the share of the image it covers."""
    h, w, _ = image_shape(model)
    rows = []
    for depth, f in enumerate(model.feature_info, start=1):
        rf = f["receptive_field"]
        rows.append(
            dict(
                depth=depth,
                layer=f["module"],
                shape="x".join(str(s) for s in f["shape"]),
                stride=f["reduction"] if f["reduction"] is not None else "-",
                receptive_field=rf,
                covers=min(rf, h) * min(rf, w) / (h * w),  # share of the image one unit sees
            )
        )
    return rows


def receptive_field_figure(model: nn.Module, image: np.ndarray | None = None, title: str = ""):
    """Receptive-field size by depth, against the image size; with an image, the centre unit's field at each depth."""
    if not model.spatial:
        raise ViewNotApplicable(
            "receptive fields: every unit of the dense autoencoder sees the whole image from its first "
            "layer on, so there is no growth with depth to show"
        )
    rows = receptive_field_table(model)
    h, w, _ = image_shape(model)
    panels = 2 if image is not None else 1
    fig = Figure(figsize=(10 if panels == 2 else 6.5, 4.2))
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0, 0]
    depth = [r["depth"] for r in rows]
    ax.plot(depth, [r["receptive_field"] for r in rows], "o-", label="receptive field (px)")
    strides = [r["stride"] for r in rows]
    ax.plot(depth, strides, "s--", color="tab:green", label="stride (px)")
    ax.axhline(max(h, w), color="tab:red", ls=":", label=f"image size ({h}x{w})")
    ax.set_xticks(depth)
    ax.set_xticklabels([r["layer"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("pixels")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("receptive field and stride by depth", fontsize=9)
    if image is not None:
        ax2 = axes[0, 1]
        show_image(ax2, np.asarray(image))
        layers = hierarchy_layers(model)
        if model.layer_names[0] not in layers:
            layers = [model.layer_names[0], *layers]
        colors = matplotlib.colormaps["autumn"](np.linspace(0, 0.85, len(layers)))
        for layer, color in zip(layers, colors):
            info = model.layer_info(layer)
            cy, cx = (info["shape"][1] - 1) // 2, (info["shape"][2] - 1) // 2
            top, left, bottom, right = model.receptive_box(layer, cy, cx)
            ax2.add_patch(
                matplotlib.patches.Rectangle(
                    (left - 0.5, top - 0.5),
                    right - left,
                    bottom - top,
                    fill=False,
                    lw=2,
                    ec=color,
                    label=f"{layer}: {info['receptive_field']} px",
                )
            )
        ax2.set_xlim(-0.5, w - 0.5)
        ax2.set_ylim(h - 0.5, -0.5)
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        ax2.set_title("the centre unit's field (clipped to the image)", fontsize=9)
    fig.suptitle(f"{title + ': ' if title else ''}receptive-field growth", fontsize=10)
    fig.tight_layout()
    return fig
