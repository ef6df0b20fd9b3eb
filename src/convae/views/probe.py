"""Probe accuracy by layer, from a `convae probe` results.json."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from ..errors import ConfigError
from ..readback import field, quoted, read_json

#: A results.json holds a row per layer, pooling and classifier: a few hundred kB at most.
MAX_RESULTS_BYTES = 16 << 20


def load_probe_results(path: str | Path) -> list[dict]:
    """The rows of a `convae probe` results.json, checked for the keys the views need.

    Read through the bounded reader: no FIFO waited on, no file larger than a results file can be.
    """
    path = Path(path)
    what = "a `convae probe` results.json"
    if not os.path.lexists(path):
        raise ConfigError(
            f"--probe {quoted(path)}: no such file (write one with `convae probe RUN_DIR --train ... --test ... -o results.json`)"
        )
    doc = read_json(path, MAX_RESULTS_BYTES, what, ConfigError)
    rows = field(doc, "rows", list, path, what, ConfigError)
    if not rows:
        raise ConfigError(f"--probe {quoted(path)}: no rows; pass the results.json `convae probe` writes")
    for i, r in enumerate(rows):
        field(r, "features", str, path, f"{what} (row {i})", ConfigError)
        field(r, "classifier", str, path, f"{what} (row {i})", ConfigError)
        accuracy = field(r, "accuracy", (int, float), path, f"{what} (row {i})", ConfigError)
        if not math.isfinite(accuracy):
            raise ConfigError(f"--probe {quoted(path)}: row {i} accuracy {accuracy!r} is not a finite number")
        for key, value in r.items():
            if isinstance(value, (dict, list)):  # the views print and plot the rows' values
                raise ConfigError(f"--probe {quoted(path)}: row {i} {key!r} is a {type(value).__name__}; not {what}")
    return rows


def _split_feature_name(name: str) -> tuple[str, str, str]:
    """'stage2/grid4' -> ('', 'stage2', 'grid4'); 'random/stage2/grid4' -> ('random', 'stage2', 'grid4');
    'pixels' -> ('pixels', '', '')."""
    parts = str(name).split("/")
    if len(parts) == 1:
        return parts[0], "", ""
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return "/".join(parts[:-2]), parts[-2], parts[-1]


def probe_figure(rows: Sequence[dict], layer_order: Sequence[str] | None = None, title: str = ""):
    """Test accuracy by layer: a line per classifier and pooling (dashed: random weights, other runs
    dotted), the pixel and PCA baselines as horizontal lines; a panel per labels-per-class."""
    groups = list(dict.fromkeys(str(r.get("labels_per_class", "all")) for r in rows))
    layers: list[str] = []
    for r in rows:
        _, layer, _ = _split_feature_name(r["features"])
        if layer and layer not in layers:
            layers.append(layer)
    if layer_order:
        order = {n: i for i, n in enumerate(layer_order)}
        layers.sort(key=lambda n: order.get(n, len(order)))
    pos = {n: i for i, n in enumerate(layers)}
    width = max(5.0, 1.0 * len(layers) + 2.4) * len(groups) + 0.6
    fig = Figure(figsize=(width, 5.6))
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)
    colours = matplotlib.colormaps["tab10"]
    series_colour: dict[str, int] = {}
    for ax, group in zip(axes[0], groups):
        sel = [r for r in rows if str(r.get("labels_per_class", "all")) == group]
        lines: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
        flat = []
        for r in sel:
            source, layer, pool = _split_feature_name(r["features"])
            if layer:
                lines.setdefault((source, r["classifier"], pool), []).append((pos[layer], float(r["accuracy"])))
            else:
                dim = r.get("dim")
                label = f"{source} ({dim})" if source == "pca" and dim else source
                flat.append((label, r["classifier"], float(r["accuracy"])))
        for (source, clf, pool), pts in lines.items():
            pts.sort()
            key = f"{clf}/{pool}"
            colour = colours(series_colour.setdefault(key, len(series_colour)) % 10)
            style = "-" if not source else "--" if source == "random" else ":"
            label = f"{source + ' ' if source else ''}{clf}, {pool}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=4, color=colour, label=label)
        greys = iter(["0.25", "0.5", "0.65", "0.75", "0.4", "0.55"])
        for name, clf, acc in flat:
            ax.axhline(acc, color=next(greys, "0.5"), lw=1, ls="-.", label=f"{name}, {clf}: {acc:.3f}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.4, len(layers) - 0.6)
        ax.set_title(f"{group} labels per class", fontsize=9)
        ax.grid(alpha=0.3)
        # outside the plot, so no line hides behind it
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    axes[0, 0].set_ylabel("test accuracy")
    fig.suptitle(
        f"{title + ': ' if title else ''}probe accuracy by layer "
        "(frozen features; dashed: the same network with random weights)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
