"""The run directory, the unit users keep and share.

    RUN_DIR/config.json         every model, data and training setting, and the convae version
    RUN_DIR/model.safetensors   weights (never pickle)
    RUN_DIR/history.csv         one row per epoch
    RUN_DIR/checkpoint/last.pt  what --resume needs (loaded with weights_only=True)
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._io import atomic_path, atomic_write_text
from ._version import __version__
from .config import RunConfig, from_dict, to_dict
from .errors import ConfigError, RunDirError
from .model import build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint/last.pt"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def save_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(to_dict(config), indent=2) + "\n")


def load_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: no such run directory (create one with `convae fit DATA --out {run_dir}`)")
    if not path.is_file():
        raise RunDirError(f"{path}: missing; {run_dir} is not a convae run directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict):
        version = data.get("convae_version")
        if isinstance(version, str) and _version_tuple(version)[:2] > _version_tuple(__version__)[:2]:
            raise RunDirError(
                f"{path}: written by convae {version}, newer than this convae {__version__}; upgrade convae to load it"
            )
    try:
        return from_dict(RunConfig, data, where=str(path))
    except ConfigError as e:
        raise RunDirError(str(e)) from e


def save_weights(path: Path, model: torch.nn.Module) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"convae_version": __version__})


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """The trained model of a run directory, in eval mode, on `device` (GPU-trained weights load on CPU)."""
    config = load_config(run_dir)
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise RunDirError(f"{path}: missing; the run has not finished an epoch yet (resume it with --resume)")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise RunDirError(f"{path}: not a readable safetensors file ({e})") from e
    model = build_model(config.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shapes differ"
        raise RunDirError(f"{path}: weights do not match {CONFIG_FILE} ({first})") from e
    return model.to(device).eval(), config


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable checkpoint is the same user-facing problem
        raise RunDirError(f"{path}: unreadable checkpoint ({type(e).__name__}); cannot resume from it") from e
