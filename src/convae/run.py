"""The run directory, the unit users keep and share.

    RUN_DIR/config.json         every model, data and training setting, and the convae version
    RUN_DIR/model.safetensors   weights (never pickle)
    RUN_DIR/history.csv         one row per epoch
    RUN_DIR/checkpoint/last.pt  what --resume needs (loaded with weights_only=True)

Every file is written atomically (see :mod:`convae._io`). Nothing in a run directory is
trusted: config.json is parsed strictly and checked against the weights before any tensor is
allocated, weights are safetensors (no code runs when they load), checkpoints load with
``torch.load(weights_only=True)`` and are checked field by field.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from . import distributed
from ._io import atomic_write_bytes, atomic_write_text, lock_dir, make_folders, remove_stale_tmp
from ._version import __version__
from .config import RunConfig, from_dict, to_dict
from .errors import ConfigError, RunDirError
from .models import build_model
from .models.memory import check_inference_memory
from .outputs import holds_other_files, is_run_dir
from .readback import open_bounded, quoted, read_csv_rows, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint/last.pt"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE, CHECKPOINT_FILE)

#: config.json is a few kB; anything this large is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 << 20
#: history.csv has one short row per epoch.
MAX_HISTORY_BYTES = 64 << 20


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())[:9]
        parts.append(int(digits or 0))
    return tuple(parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def save_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(to_dict(config), indent=2) + "\n")


def load_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig of a run directory; any problem is a one-line RunDirError naming config.json."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{quoted(run_dir)}: no such run directory (create one with `convae fit DATA --out DIR`)")
    if not os.path.lexists(path):
        raise RunDirError(f"{quoted(path)}: missing; {quoted(run_dir)} is not a convae run directory")
    data = read_json(path, MAX_CONFIG_BYTES, "a convae config", RunDirError)
    if isinstance(data, dict):
        version = data.get("convae_version")
        if isinstance(version, str) and _version_tuple(version)[:2] > _version_tuple(__version__)[:2]:
            raise RunDirError(
                f"{path}: written by convae {version[:40]}, newer than this convae {__version__}; "
                "upgrade convae to load it"
            )
    try:
        config = from_dict(RunConfig, data, where=str(path))
    except ConfigError as e:
        raise RunDirError(_first_line(e)) from e
    except RecursionError as e:
        raise RunDirError(f"{path}: nested too deeply to be a convae config") from e
    return config


def expected_state(config: RunConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the config's model holds, found without allocating them."""
    try:
        with torch.device("meta"):
            model = build_model(config.model)
    except ConfigError:
        raise
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise ConfigError(f"the model of this config cannot be built ({_first_line(e)})") from e
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def save_weights(path: Path, model: torch.nn.Module) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # serialized in memory, written by Python: a full disk is then a clear ENOSPC
    atomic_write_bytes(path, safetensors_bytes(state, metadata={"convae_version": __version__}))


_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, str(dtype))


def check_state(found: dict[str, tuple[tuple[int, ...], Any]], config: RunConfig, where: str | Path) -> None:
    """Tensors `found` (name -> (shape, dtype)) are exactly those of the config's model, else RunDirError.

    Checked on the meta device: a config that asks for an enormous model allocates nothing.
    """
    try:
        expected = expected_state(config)
    except ConfigError as e:
        raise RunDirError(f"{where}: {e}") from e
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    hint = f"the weights do not match {CONFIG_FILE}; use the config and weights of the same run"
    if missing:
        raise RunDirError(f"{where}: lacks tensor {missing[0]} ({len(missing)} missing); {hint}")
    if unexpected:
        raise RunDirError(f"{where}: has unexpected tensor {unexpected[0]} ({len(unexpected)} extra); {hint}")
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != shape:
            raise RunDirError(
                f"{where}: tensor {name} has shape {list(got_shape)} but {CONFIG_FILE} needs {list(shape)}; {hint}"
            )
        if _dtype_name(got_dtype) != _dtype_name(dtype):
            raise RunDirError(
                f"{where}: tensor {name} is {_dtype_name(got_dtype)}, expected {_dtype_name(dtype)}; {hint}"
            )


def _check_weights_header(path: Path, config: RunConfig) -> None:
    """The tensors of `path` match those of the config's model, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            found = {}
            for name in f.keys():
                sl = f.get_slice(name)
                found[name] = (tuple(sl.get_shape()), sl.get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunDirError(f"{path}: not a readable safetensors file ({_first_line(e)}); replace it") from e
    check_state(found, config, path)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """The trained model of a run directory, in eval mode, on `device` (GPU-trained weights load on CPU).

    The weights file is checked against config.json (names, shapes, dtypes, finite values)
    before the model is built, so a foreign or tampered file is a clear error, not a crash
    or a huge allocation.

    Parameters
    ----------
    run_dir : path
        What ``convae fit --out`` (or ``ConvAutoencoder.save``) wrote.
    device : str or torch.device

    Returns
    -------
    (AutoencoderNet, RunConfig)
        The net (see ``convae.models.base.AutoencoderNet``) and the run's settings.

    Examples
    --------
    >>> model, config = load_model("runs/mnist")                       # doctest: +SKIP
    >>> maps = model.forward_intermediates(x, ["stage1", "stage2.conv1"])  # doctest: +SKIP
    """
    config = load_config(run_dir)
    path = Path(run_dir) / WEIGHTS_FILE
    if not os.path.lexists(path):
        raise RunDirError(f"{quoted(path)}: missing; the run has not finished an epoch yet (resume it with --resume)")
    with open_bounded(path, weights_bound(config), "convae weights", RunDirError):
        pass  # a regular file no larger than this config's weights can be: no FIFO waited on, no mmap of a huge file
    _check_weights_header(path, config)
    try:  # the weights fit any image size a conv net is given: config.json's must fit memory too
        check_inference_memory(config.model, device, quoted(Path(run_dir) / CONFIG_FILE))
    except ConfigError as e:
        raise RunDirError(str(e)) from e
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunDirError(f"{path}: not a readable safetensors file ({_first_line(e)}); replace it") from e
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RunDirError(f"{path}: tensor {name} holds NaN or infinite values; the weights are unusable")
    model = build_model(config.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunDirError(f"{path}: weights do not match {CONFIG_FILE} ({_first_line(e)})") from e
    return model.to(device).eval(), config


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """history.csv's rows, each value a number; none when the run has no history yet."""
    path = Path(run_dir) / HISTORY_FILE
    if not os.path.lexists(path):
        return []
    what = "a convae history"
    rows = read_csv_rows(path, MAX_HISTORY_BYTES, what, RunDirError)
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            out.append({k: float(v) for k, v in row.items()})
        except (TypeError, ValueError) as e:
            raise RunDirError(f"{quoted(path)}: line {line} is not numbers ({_first_line(e)[:80]}); not {what}") from e
    if out and not all(math.isfinite(r.get("epoch", math.nan)) and "val_mse" in r for r in out):
        raise RunDirError(f"{quoted(path)}: no finite 'epoch' or no 'val_mse' column; not {what}, remove or replace it")
    return out


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)  # in memory first: a full disk then fails as a clear ENOSPC
    atomic_write_bytes(path, buf.getbuffer())


_CHECKPOINT_FIELDS = {
    "model": dict,
    "optimizer": dict,
    "epoch": int,
    "step": int,
    "elapsed": (int, float),
    "history": list,
}


#: A checkpoint holds the weights, two Adam moments of each and a short history: its bound,
#: from the weights it must hold, is this many times their bytes plus room for the rest.
_CHECKPOINT_WEIGHT_COPIES = 4
_CHECKPOINT_SLACK_BYTES = 64 << 20


def weights_bound(config: RunConfig) -> int:
    """The most bytes model.safetensors of `config` can take: its tensors and a header (names, shapes)."""
    state = expected_state(config)
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in state.values()) + 256 * len(state) + (1 << 20)


def checkpoint_bound(config: RunConfig) -> int:
    """The most bytes a checkpoint of `config`'s model can take (sized from the weights, on meta)."""
    weights = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected_state(config).values())
    return _CHECKPOINT_WEIGHT_COPIES * weights + _CHECKPOINT_SLACK_BYTES


def load_checkpoint(path: Path, max_bytes: int = 1 << 34) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, loaded without pickle and checked field by field.

    Read through the bounded reader: a FIFO in its place is refused, not waited on, and a file
    above `max_bytes` (see :func:`checkpoint_bound`) is refused before torch reads it.
    """
    fix = "cannot resume from it (start the run again with another --out)"
    with open_bounded(path, max_bytes, "a convae checkpoint", RunDirError) as f:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable checkpoint is the same user-facing problem
            raise RunDirError(f"{quoted(path)}: unreadable checkpoint ({type(e).__name__}); {fix}") from e
    bad = _checkpoint_problem(state)
    if bad:
        raise RunDirError(f"{quoted(path)}: not a convae checkpoint ({bad}); {fix}")
    return state


def _checkpoint_problem(state: Any) -> str | None:
    """What makes `state` no checkpoint save_checkpoint wrote, or None."""
    if not isinstance(state, dict):
        return "not a dict"
    for name, kind in _CHECKPOINT_FIELDS.items():
        value = state.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"field {name!r} missing or malformed"
    if state["epoch"] < 0 or state["step"] < 0 or not math.isfinite(state["elapsed"]):
        return "negative epoch or step"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "field 'model' holds non-tensors"
    for row in state["history"]:
        if not isinstance(row, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in row.items()
        ):
            return "field 'history' malformed"
    return None


# ---------------------------------------------------------------------------------------------
# starting and resuming runs
# ---------------------------------------------------------------------------------------------
def has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds trained weights or a checkpoint (anything a rerun would lose)."""
    return (run_dir / CHECKPOINT_FILE).exists() or (run_dir / WEIGHTS_FILE).exists()


def lock_run(run_dir: Path):
    """Create `run_dir` if needed and lock it for this process; RunDirError if another convae holds it.

    The lock (flock on the directory) goes away with the process, even when it is killed.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: is a file, not a run directory; choose another --out")
    try:
        make_folders(run_dir)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run_dir}: {e.strerror or e}") from e
    lock = lock_dir(run_dir)
    if lock is None:
        raise RunDirError(
            f"{run_dir}: another convae process is training into this run directory; "
            "wait for it to finish or choose another --out"
        )
    return lock


def remove_run(run_dir: Path) -> None:
    """Remove a run's own files (and their temporaries) from `run_dir`; anything else stays.

    Only for a folder that holds a run (:func:`convae.outputs.is_run_dir`), while no process
    trains into it; the folder itself goes only when nothing else is left in it.
    """
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir}: not a convae run; nothing removed")
    with lock_run(run_dir):
        clean_run_dir(run_dir)
        for name in (CHECKPOINT_FILE, HISTORY_FILE, WEIGHTS_FILE, CONFIG_FILE):  # config.json last: a run until then
            (run_dir / name).unlink(missing_ok=True)
    for folder in ((run_dir / CHECKPOINT_FILE).parent, run_dir):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty folder goes: nothing of the user's in it


def clean_run_dir(run_dir: Path) -> None:
    """Remove the temporary files a killed process left in `run_dir` (call while holding its lock)."""
    remove_stale_tmp(run_dir, RUN_FILES)


def check_run_folder(run_dir: Path, force: bool = False) -> bool:
    """Whether `run_dir` already holds a convae run; RunDirError for a folder of other files.

    A folder that exists, holds files and is not a run (no config.json of a run) is the user's:
    refused unless `force`, and even then no file of a run's name in it is replaced.
    """
    if is_run_dir(run_dir):
        return True
    if not holds_other_files(run_dir):
        return False
    taken = [name for name in RUN_FILES if os.path.lexists(run_dir / name)]
    if taken:  # a file of a run's name that is no run's: the user's, which a run would replace
        raise RunDirError(
            f"{run_dir / taken[0]}: not a convae run's file; convae never replaces it, choose another --out"
        )
    if not force:
        raise RunDirError(
            f"{run_dir}: a folder of other files, not a convae run; choose a new or empty --out, "
            "or pass --force to write the run beside them (they are kept)"
        )
    return False


def start_run(
    run_dir: Path,
    config: RunConfig,
    resume: bool,
    shape,
    dist_info,
    on_nan: str | None = None,
    force: bool = False,
):
    """Check and lock the run directory; (config, checkpoint or None, lock).

    On resume the run's saved config wins (only the NaN policy, which does not change the
    weights of steps that go well, may change) and its checkpoint is checked against it. A
    directory whose run never finished an epoch (config.json only: killed early) holds nothing
    to lose: a plain rerun starts it again with the new settings, --resume with the saved ones.
    A folder of other files is refused unless `force` (see :func:`check_run_folder`).
    """
    ckpt_path = run_dir / CHECKPOINT_FILE
    if resume and not (run_dir / CONFIG_FILE).is_file() and not ckpt_path.is_file():
        raise RunDirError(f"{run_dir}: nothing to resume (no {CHECKPOINT_FILE}); start it without --resume")
    lock = lock_run(run_dir) if dist_info.is_main else None
    try:
        was_run = resume or check_run_folder(run_dir, force)
        checkpoint = None
        if resume:
            config, checkpoint = _resumed(run_dir, config, shape, dist_info, on_nan)
        elif has_progress(run_dir):
            raise RunDirError(
                f"{run_dir} already holds a run: continue it with --resume, or choose another --out "
                "(convae never overwrites a run)"
            )
        distributed.barrier(dist_info)  # every rank has checked the directory before rank 0 writes
        if dist_info.is_main:
            if was_run:  # only a run's folder: in any other, a look-alike may be the user's file
                clean_run_dir(run_dir)  # temporary files of a killed run
            save_config(run_dir, config)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return config, checkpoint, lock


def _resumed(run_dir: Path, config: RunConfig, shape, dist_info, on_nan: str | None):
    """The saved config of the run to resume (checked against the data) and its checkpoint, if any."""
    saved = load_config(run_dir)
    train = saved.train if on_nan is None else replace(saved.train, on_nan=on_nan)
    config = replace(saved, train=train, data=replace(saved.data, spec=config.data.spec or saved.data.spec))
    n, h, w, c = shape
    m = saved.model
    if (h, w) != tuple(m.image_size) or c != m.in_channels:
        raise RunDirError(
            f"{run_dir} was trained on {m.image_size[0]}x{m.image_size[1]}x{m.in_channels} images, "
            f"these are {h}x{w}x{c}; resume it with the same data"
        )
    if saved.data.num_images and saved.data.num_images != n:
        raise RunDirError(
            f"{run_dir} was trained on {saved.data.num_images} images ({saved.data.spec or 'an array'}), "
            f"this data has {n}; resume it with the same data"
        )
    ckpt_path = run_dir / CHECKPOINT_FILE
    if os.path.lexists(ckpt_path):
        checkpoint = load_checkpoint(ckpt_path, checkpoint_bound(config))
        found = {k: (tuple(v.shape), v.dtype) for k, v in checkpoint["model"].items()}
        check_state(found, config, ckpt_path)  # before a model of the config is built
        return config, checkpoint
    if os.path.lexists(run_dir / WEIGHTS_FILE):  # trained weights and no checkpoint: retraining would replace them
        raise RunDirError(
            f"{quoted(run_dir)}: has trained weights but no {CHECKPOINT_FILE} (it finished, or the checkpoint "
            "was removed); nothing to resume: use the run as it is, or train a new one with another --out"
        )
    if dist_info.is_main:
        warnings.warn(
            f"{run_dir}: no checkpoint yet (the run stopped before its first epoch ended); "
            "starting it from the beginning with its saved settings",
            stacklevel=4,
        )
    return config, None
