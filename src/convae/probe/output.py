"""Probe results on disk: results.json and its Markdown copy."""

from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write_text
from .._version import __version__
from ..errors import ConfigError


def markdown_table(rows: list[dict]) -> str:
    """The rows as a GitHub Markdown table."""
    head = [
        "features",
        "classifier",
        "normalize",
        "augment",
        "dim",
        "labels/class",
        "accuracy",
        "± (seeds or folds)",
        "macro-F1",
        "fit s",
        "iterations",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 7) + "|"]
    for r in rows:
        if r.get("folds"):
            spread = f"{r['accuracy_std']:.4f} ({r['folds']} folds)"
        else:
            spread = f"{r['accuracy_std']:.4f} ({r['seeds']})" if r["seeds"] > 1 else "-"
        cells = [
            r["features"],
            r["classifier"],
            r.get("normalize", "standard"),
            r.get("augment", "none"),
            str(r["dim"]),
            str(r["labels_per_class"]),
            f"{r['accuracy']:.4f}",
            spread,
            f"{r['macro_f1']:.4f}",
            f"{r['fit_seconds']:.2f}",
            "-" if r.get("iterations") is None else str(r["iterations"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], path: str | Path, **meta) -> tuple[Path, Path]:
    """Write ``{"rows": [...]}`` (plus `meta`) as JSON to `path`, and the table as Markdown beside it."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ConfigError(f"output {path}: name it .json (a Markdown copy is written beside it as .md)")
    md = path.with_suffix(".md")
    document = {"convae_version": __version__, **meta, "rows": rows}
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    title = ", ".join(f"{k} `{v}`" for k, v in meta.items() if v)
    atomic_write_text(md, (f"# convae probe\n\n{title}\n\n" if title else "") + markdown_table(rows))
    return path, md
