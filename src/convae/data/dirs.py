"""Where built-in datasets are looked for, and the folder each has there."""

from __future__ import annotations

import os
from pathlib import Path

# dataset -> folder inside a data directory
DATASET_FOLDERS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar-10"}


def find_data_dir(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for built-in datasets, in order: `data_dir`, $CONVAE_DATA, ~/.cache/convae."""
    candidates = []
    if data_dir is not None and os.fspath(data_dir) != "":
        candidates.append(Path(data_dir).expanduser())
    env = os.environ.get("CONVAE_DATA")
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(Path.home() / ".cache" / "convae")
    out: list[Path] = []
    for c in candidates:
        if c not in out:
            out.append(c)
    return out
