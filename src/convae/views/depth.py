"""Accuracy by depth, trained vs random weights: what learning adds at each depth of the hierarchy.

A feature set's depth is that of its deepest layer: the position of the first of the net's
hierarchy layers (``hierarchy_layers``: one per depth) at or after it in network order, so
``stage1.conv1``, its split and ``stage1`` are depth 1, ``stage2.conv1`` depth 2, a layer past the
last one (a code at the top) the last depth, and a set joining depths (``stage1+stage2``) counts
at its deepest. For each setting (classifier, pooling, labels per
class) the best trained set at each depth is drawn beside the best random-weight set there.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from .common import ViewNotApplicable
from .probe import _split_feature_name


def layer_depth(model, layer: str) -> int:
    """The 1-based position of the first hierarchy layer at or after `layer` in network order."""
    order = model.feature_layer_names()
    position = order.index(layer)
    hierarchy = [order.index(h) for h in model.hierarchy_layers()]
    return next((i for i, h in enumerate(hierarchy, start=1) if h >= position), len(hierarchy))


def depth_rows(rows: Sequence[dict], model) -> list[dict]:
    """Per setting and depth: the best trained and random feature sets there, and the margin."""
    valid = set(model.feature_layer_names())
    best: dict[tuple, dict] = {}
    for r in rows:
        source, layers, pool = _split_feature_name(r["features"])
        names = layers.split("+") if layers else []
        if source not in ("", "random") or not names or not set(names) <= valid:
            continue
        depth = max(layer_depth(model, n) for n in names)
        setting = f"{r['classifier']}, {pool}, {r.get('labels_per_class', 'all')} labels/class"
        key, side = (setting, depth), "random" if source else "trained"
        entry = best.setdefault(key, dict(setting=setting, depth=depth))
        if side not in entry or r["accuracy"] > entry[side]:
            entry[side], entry[f"{side}_features"] = float(r["accuracy"]), r["features"]
    out = sorted(best.values(), key=lambda e: (e["setting"], e["depth"]))
    for e in out:
        if "trained" in e and "random" in e:
            e["margin"] = e["trained"] - e["random"]
    return out


def depth_figure(rows: Sequence[dict], model, title: str = "") -> Figure:
    """A line per setting: the best trained set's accuracy by depth, dashed: random weights."""
    table = depth_rows(rows, model)
    if not table:
        raise ViewNotApplicable("accuracy by depth: the probe results have no rows of this model's layers")
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    settings = list(dict.fromkeys(e["setting"] for e in table))
    colours = [f"C{i % 10}" for i in range(len(settings))]
    for setting, colour in zip(settings, colours):
        entries = [e for e in table if e["setting"] == setting]
        for side, style in (("trained", "-"), ("random", "--")):
            points = [(e["depth"], e[side]) for e in entries if side in e]
            if points:
                label = f"{setting}" if side == "trained" else f"{setting}, random weights"
                ax.plot(*zip(*points), style, marker="o", ms=4, color=colour, label=label)
    depths = sorted({e["depth"] for e in table})
    ax.set_xticks(depths)
    ax.set_xlabel("depth (deepest layer of the feature set)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title + ': ' if title else ''}accuracy by depth, trained (solid) vs random weights (dashed)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig
