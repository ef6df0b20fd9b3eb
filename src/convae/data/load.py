"""`load_dataset`: a built-in dataset, a folder of images or a .npy/.npz file, by one name."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .arrays import _check_channels, _check_image_size, _convert_data, _load_npy, _load_npz
from .builtin import BUILTIN_DATASETS, SPLITS, _load_cifar, _load_digits, _load_idx_dataset
from .containers import ImageData
from .folders import _load_folder

_UNKNOWN = (
    "unknown dataset {!r}: expected digits, mnist, fashion-mnist, cifar10, a folder of images, or a .npy/.npz file"
)


def load_dataset(
    spec: str | os.PathLike,
    split: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    download: bool = True,
    progress: bool = False,
    max_memory_bytes: int = 2 * 1024**3,
) -> ImageData:
    """Load a built-in dataset (``"mnist"``, ``"mnist:test"``...), a folder of images or a .npy/.npz file.

    Parameters
    ----------
    spec : str or path
        digits, mnist, fashion-mnist, cifar10 (optionally ``:train`` / ``:test``), a folder of
        images (class subfolders give labels) or a .npy/.npz file.
    split : str, optional
        ``train`` (default) or ``test`` for built-ins; for a folder, a subfolder.
    data_dir : path, optional
        Where built-in datasets are looked up first (then $CONVAE_DATA, ~/.cache/convae).
    image_size : int or (int, int), optional
        Resize and centre-crop to this size (required for folders of mixed sizes).
    channels : {1, 3}, optional
        Convert to grayscale or RGB.
    download : bool
        Download a missing built-in dataset (verified against the official checksums).
    max_memory_bytes : int
        A folder larger than this decoded is returned as :class:`LazyImages`.

    Returns
    -------
    ImageData
        ``images`` uint8 (N, H, W, C), ``labels`` (or None), ``classes``, ``name``.

    Examples
    --------
    >>> train = load_dataset("digits", "train")
    >>> train.images.shape, train.images.dtype
    ((1437, 8, 8, 1), dtype('uint8'))
    """
    size = _check_image_size(image_size)
    channels = _check_channels(channels)
    raw = os.fspath(spec)
    if not isinstance(raw, str):
        raw = os.fsdecode(raw)
    name, sep, spec_split = raw.partition(":")
    if name.lower() in BUILTIN_DATASETS:
        name = name.lower()
        if sep and split is not None and spec_split != split:
            raise DataError(f"dataset {raw!r} names split {spec_split!r} but split {split!r} was also given; give one")
        split = (spec_split if sep else split) or "train"
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} for {name}: expected one of {', '.join(SPLITS)}")
        if name == "digits":
            data = _load_digits(split)
        elif name == "cifar10":
            data = _load_cifar(split, data_dir, download, progress)
        else:
            data = _load_idx_dataset(name, split, data_dir, download, progress)
        return _convert_data(data, size, channels)

    path = Path(raw).expanduser()
    if raw and path.is_dir():
        if split is not None:
            sub = path / split
            if not sub.is_dir():
                subs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
                hint = f"subfolders: {', '.join(subs)}" if subs else "it has no subfolders"
                raise DataError(f"folder {path} has no split {split!r} subfolder ({hint}); omit the split or pick one")
            path = sub
        return _load_folder(path, size, channels, progress, max_memory_bytes)
    if raw and path.exists() and not path.is_file():
        raise DataError(f"cannot load {path}: not a regular file or folder (a FIFO, device or socket?)")
    if raw and path.is_file():
        if split is not None:
            raise DataError(f"{path} has no splits; omit the split (got {split!r}) or use one file per split")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            data = _load_npy(path)
        elif suffix == ".npz":
            data = _load_npz(path)
        else:
            raise DataError(f"cannot load {path}: expected a folder of images or a .npy/.npz file")
        return _convert_data(data, size, channels)
    raise DataError(_UNKNOWN.format(raw))
