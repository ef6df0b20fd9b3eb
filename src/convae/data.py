"""Datasets: built-in benchmarks, folders of images and .npy/.npz arrays, all as uint8 NHWC.

Every loader returns an :class:`ImageData` whose ``images`` are uint8 with shape (N, H, W, C).

Built-in datasets (``BUILTIN_DATASETS``):

* ``digits``: scikit-learn's 8x8 digits (offline), values 0..16 scaled to 0..255; splits
  ``train``/``test`` are a fixed stratified 80/20 split (``random_state=0``).
* ``mnist``, ``fashion-mnist``: IDX files (``.gz`` or not) in ``<dir>/mnist/`` resp.
  ``<dir>/fashion-mnist/``.
* ``cifar10``: ``<dir>/cifar-10/cifar-10-binary.tar.gz`` (read member by member, never
  extracted to disk) or the extracted ``<dir>/cifar-10/cifar-10-batches-bin/`` (preferred when
  complete, as it is faster).

``<dir>`` is searched in the order given by :func:`find_data_dir`. Missing files are downloaded
into the first writable directory of that list, verified against the official MD5 checksums
(``CHECKSUMS``) and only then renamed into place. Files a user placed are read as they are.

Behaviour choices for folders of images:

* Transparent pixels (RGBA, LA, P or RGB/L with a transparency key) are composited on **white**.
* 16-bit images ("I;16", "I") are scaled from 0..65535 to 0..255 (rounded), not clipped; "F"
  images are taken as 0..1 when their maximum is at most 1, else as 0..255.
* EXIF orientation is applied; animated images use their first frame.
* Hidden files and folders (names starting with ".") are ignored; symlinked folders are not
  followed.
* A folder that would take more than ``max_memory_bytes`` decoded is returned as
  :class:`LazyImages`. Every file is still decoded once while loading (and discarded), so
  unreadable files are skipped up front rather than failing in the middle of training.

Array layout rule (``.npy``/``.npz``/:func:`as_uint8_images`): 3-D is (N, H, W); 4-D is
(N, C, H, W) when ``shape[1]`` is 1, 3 or 4 and ``shape[3]`` is not, otherwise (N, H, W, C).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import hashlib
import http.client
import math
import os
import stat
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from ._io import atomic_path
from .errors import DataError, SkippedFileWarning

__all__ = [
    "BUILTIN_DATASETS",
    "CHECKSUMS",
    "IMAGE_EXTENSIONS",
    "MIRRORS",
    "ImageData",
    "LazyImages",
    "as_uint8_images",
    "find_data_dir",
    "load_dataset",
    "to_float_nchw",
]

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")
SPLITS: tuple[str, ...] = ("train", "test")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tiff", ".tif", ".webp")

#: Official MD5 checksums of the downloaded files (as torchvision lists them). Tests monkeypatch this.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
}

#: Base URLs tried in order. ``$CONVAE_DOWNLOAD_URL`` replaces them with ``<base>/<folder>/``.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}

# dataset -> folder inside a data directory
_FOLDERS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar-10"}

_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR_TAR = "cifar-10-binary.tar.gz"
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR_RECORD = 1 + 3 * 32 * 32

_DOWNLOAD_TIMEOUT_S = 60
_IDX_MAX_BYTES = 1 << 33  # 8 GiB: anything more is a broken header, not a dataset
_META_MAX_BYTES = 1 << 16  # batches.meta.txt: ten class names
_MAX_LABEL = 1 << 20  # class indices beyond this are not class indices
_ZIP_MAX_RATIO = 1100  # deflate cannot compress more than ~1032:1; a member claiming more is a zip bomb
_NPY_MAX_HEADER = 1 << 16
_CHUNK = 1 << 20
_UNKNOWN = (
    "unknown dataset {!r}: expected digits, mnist, fashion-mnist, cifar10, a folder of images, or a .npy/.npz file"
)


# ---------------------------------------------------------------------------------------------
# public containers
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """Images (uint8, N x H x W x C), optional integer labels and class names, and a name."""

    images: Union[np.ndarray, "LazyImages"]
    labels: np.ndarray | None
    classes: list[str] | None
    name: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)


class LazyImages:
    """An array-like of images decoded from files on access (for folders too large for memory).

    ``x[i]`` gives one (H, W, C) uint8 image; a slice, an integer array or a boolean mask gives
    (n, H, W, C). Holds only paths and preprocessing settings, so it pickles cheaply.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: tuple[int, int], channels: int):
        self.paths = [os.fspath(p) for p in paths]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), *self.image_size, self.channels)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, dtype=uint8)"

    def _one(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            return _decode(path, self.image_size, self.channels)
        except Exception as e:  # the file changed since it was checked at load time
            raise DataError(f"cannot read image {path}: {_reason(e)}; reload the folder") from e

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            n = len(self.paths)
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for {n} images")
            return self._one(i % n)
        indices = np.arange(len(self.paths))[idx]
        if indices.ndim != 1:
            raise IndexError("LazyImages supports an int, a slice, or a 1-D integer/boolean index")
        out = np.empty((len(indices), *self.image_size, self.channels), dtype=np.uint8)
        for k, i in enumerate(indices):
            out[k] = self._one(int(i))
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
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

    `image_size` (int for square, or (H, W)) and `channels` (1 or 3) convert the images when given
    and different; for a folder of images with mixed sizes `image_size` is required. `split` is
    ``train`` (default) or ``test`` for built-ins; for a folder it names a subfolder.
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


def to_float_nchw(batch_uint8_nhwc) -> "torch.Tensor":  # noqa: F821
    """uint8 (N, H, W, C) array or tensor -> contiguous float32 (N, C, H, W) tensor in [0, 1]."""
    import torch

    if isinstance(batch_uint8_nhwc, torch.Tensor):
        t = batch_uint8_nhwc
    else:
        arr = np.asarray(batch_uint8_nhwc)
        if not arr.flags.writeable:
            arr = arr.copy()
        t = torch.from_numpy(arr)
    if t.dtype != torch.uint8:
        raise TypeError(f"to_float_nchw expects uint8 images, got {t.dtype}")
    if t.ndim != 4:
        raise ValueError(f"to_float_nchw expects a (N, H, W, C) batch, got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255)


def as_uint8_images(X, *, name: str = "X") -> np.ndarray:
    """Images as uint8 (N, H, W, C) from an array (N, H, W), (N, H, W, C) or (N, C, H, W).

    uint8 is taken as is, other integers must lie in 0..255, floats in [0, 1] (scaled by 255 and
    rounded). Anything else raises DataError naming `name`.
    """
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor
        X = X.detach().cpu().numpy()
    try:
        arr = np.asarray(X)
    except (ValueError, TypeError) as e:
        raise DataError(f"{name}: cannot be read as an array of images ({_reason(e)})") from e
    return _to_uint8_nhwc(arr, name)


# ---------------------------------------------------------------------------------------------
# option checks and in-memory conversion
# ---------------------------------------------------------------------------------------------
def _check_image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise DataError(f"image size {image_size!r} is invalid: pass a positive integer or (height, width)")
    if min(size) < 1:
        raise DataError(f"image size {image_size!r} is invalid: pass a positive integer or (height, width)")
    return size


def _check_channels(channels) -> int | None:
    if channels is None:
        return None
    if isinstance(channels, bool) or channels not in (1, 3):
        raise DataError(f"channels {channels!r} is invalid: pass 1 (grayscale) or 3 (RGB)")
    return int(channels)


def _to_uint8_nhwc(arr: np.ndarray, where: str) -> np.ndarray:
    kind = arr.dtype.kind
    if kind not in "uif":
        what = "an object array" if kind == "O" else f"dtype {arr.dtype}"
        raise DataError(f"{where}: images must be uint8, integers in 0..255 or floats in [0, 1], got {what}")
    if arr.ndim == 3:
        arr = arr[..., None]
    elif arr.ndim == 4:
        if arr.shape[1] in (1, 3, 4) and arr.shape[3] not in (1, 3, 4):
            arr = arr.transpose(0, 2, 3, 1)
    else:
        raise DataError(
            f"{where}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {tuple(arr.shape)}"
        )
    n, h, w, c = arr.shape
    if n == 0 or h == 0 or w == 0:
        raise DataError(f"{where}: holds no images (shape {tuple(arr.shape)})")
    if c not in (1, 2, 3, 4):
        raise DataError(
            f"{where}: cannot tell the channel axis of shape {tuple(arr.shape)}: "
            "use (N, H, W, C) or (N, C, H, W) with C in 1, 3 or 4"
        )
    if kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: float images contain NaN or infinity; clean the data first")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"{where}: float images must lie in [0, 1], found {lo:g}..{hi:g}; "
                "divide by 255 or save as uint8"
            )
        out = np.empty(arr.shape, dtype=np.uint8)
        for s in range(0, n, 4096):  # chunked, to bound the float temporaries
            out[s : s + 4096] = np.rint(arr[s : s + 4096].astype(np.float32) * 255)
        return out
    if arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{where}: integer images must lie in 0..255, found {lo}..{hi}; rescale them or save as uint8"
            )
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _check_labels(labels: np.ndarray, n: int, where: str) -> tuple[np.ndarray, list[str]]:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{where}: labels must have shape ({n},) to match the images, got {tuple(labels.shape)}")
    kind = labels.dtype.kind
    if kind in "US":
        names, inverse = np.unique(labels, return_inverse=True)
        return inverse.astype(np.int64).ravel(), [str(s.decode() if isinstance(s, bytes) else s) for s in names]
    if kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        labels = labels.astype(np.int64)
        kind = "i"
    if kind not in "uib":
        raise DataError(f"{where}: labels must be integers or strings, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise DataError(f"{where}: labels must be non-negative integers, found {int(labels.min())}")
    if n and labels.max() > _MAX_LABEL:
        raise DataError(f"{where}: label {int(labels.max())} is not a class index; number the classes 0..K-1")
    labels = labels.astype(np.int64)
    return labels, [str(i) for i in range(int(labels.max()) + 1 if n else 0)]


_LUMA = np.array([19595, 38470, 7471], dtype=np.uint32)  # PIL's RGB -> L weights (ITU-R 601-2), /65536


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC with C in 1..4 -> C == channels (1 or 3); alpha is composited on white."""
    c = images.shape[-1]
    if c == channels:
        return images
    out = np.empty((*images.shape[:3], channels), dtype=np.uint8)
    for s in range(0, len(images), 4096):
        x = images[s : s + 4096]
        if x.shape[-1] in (2, 4):
            alpha = x[..., -1:].astype(np.float32) / 255
            x = np.rint(x[..., :-1] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        if x.shape[-1] == channels:
            out[s : s + 4096] = x
        elif channels == 3:
            out[s : s + 4096] = np.repeat(x, 3, axis=-1)
        else:
            out[s : s + 4096, ..., 0] = ((x.astype(np.uint32) @ _LUMA + 0x8000) >> 16).astype(np.uint8)
    return out


def _resize_array(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    n, h, w, c = images.shape
    if (h, w) == size:
        return images
    out = np.empty((n, *size, c), dtype=np.uint8)
    for i in range(n):
        if c in (1, 3):
            im = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
            res = np.asarray(_fit(im, size))
            out[i] = res[..., None] if c == 1 else res
        else:  # resampling is per band anyway
            for k in range(c):
                out[i, ..., k] = np.asarray(_fit(Image.fromarray(images[i, ..., k]), size))
    return out


def _convert_data(data: ImageData, size: tuple[int, int] | None, channels: int | None) -> ImageData:
    images = data.images
    if channels is not None:
        images = _convert_channels(images, channels)
    if size is not None:
        images = _resize_array(images, size)
    data.images = images
    return data


# ---------------------------------------------------------------------------------------------
# built-in datasets
# ---------------------------------------------------------------------------------------------
def _load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    y = digits.target.astype(np.int64)
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    idx = train_idx if split == "train" else test_idx
    return ImageData(np.ascontiguousarray(images[idx]), y[idx], [str(i) for i in range(10)], f"digits:{split}")


def _idx_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _existing(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    return None


def _load_idx_dataset(name: str, split: str, data_dir, download: bool, progress: bool) -> ImageData:
    stems = _idx_names(split)
    dirs = find_data_dir(data_dir)
    found = None
    for d in dirs:
        paths = [_existing(d / _FOLDERS[name], s) for s in stems]
        if all(paths):
            found = paths
            break
    if found is None:
        files = [s + ".gz" for s in stems]
        target = _download_missing(name, files, dirs, download, progress)
        found = [target / f for f in files]
    images = _read_idx(found[0], 0x00000803)
    labels = _read_idx(found[1], 0x00000801)
    if len(images) != len(labels):
        raise DataError(
            f"{found[0]} holds {len(images)} images but {found[1]} holds {len(labels)} labels; "
            "replace the files with a matching pair"
        )
    if len(labels) and labels.max() > 9:
        raise DataError(f"{found[1]}: labels must be 0..9, found {int(labels.max())}; replace the file")
    classes = _FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return ImageData(images[..., None], labels.astype(np.int64), list(classes), f"{name}:{split}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of uint8 (plain or .gz), checked before anything big is allocated."""
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    kind = "images" if ndim == 3 else "labels"
    fix = "replace it (or delete it to download it again)"
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            header = f.read(header_len)
            if len(header) < header_len:
                raise DataError(f"{path} is truncated: the IDX header is incomplete; {fix}")
            got_magic = int.from_bytes(header[:4], "big")
            if got_magic != magic:
                raise DataError(
                    f"{path} is not an IDX {kind} file (magic 0x{got_magic:08x}, expected 0x{magic:08x}); {fix}"
                )
            dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            expected = math.prod(dims) if dims else 0  # Python ints: a hostile header cannot wrap around
            if expected > _IDX_MAX_BYTES or (ndim == 3 and (dims[1] == 0 or dims[2] == 0) and dims[0]):
                raise DataError(f"{path} has an implausible IDX header (dimensions {dims}); {fix}")
            buf = bytearray()
            while len(buf) <= expected:
                chunk = f.read(min(_CHUNK, expected + 1 - len(buf)))
                if not chunk:
                    break
                buf += chunk
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {_reason(e)} (corrupt or truncated); {fix}") from e
    if len(buf) != expected:
        what = "is truncated" if len(buf) < expected else "has trailing data"
        raise DataError(
            f"{path} {what}: the header promises {expected} bytes of {kind} (dimensions {dims}), "
            f"found {'more' if len(buf) > expected else len(buf)}; {fix}"
        )
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def _load_cifar(split: str, data_dir, download: bool, progress: bool) -> ImageData:
    dirs = find_data_dir(data_dir)
    needed = _CIFAR_FILES[split]
    for d in dirs:
        folder = d / _FOLDERS["cifar10"]
        extracted = folder / _CIFAR_DIR
        if all((extracted / f).is_file() for f in needed):
            blobs = {f: _read_cifar_file(extracted / f) for f in needed}
            meta = extracted / "batches.meta.txt"
            meta_text = None
            if meta.is_file():
                with open(meta, "rb") as f:
                    meta_text = f.read(_META_MAX_BYTES)
            return _cifar_data(blobs, needed, meta_text, split, extracted)
        if (folder / _CIFAR_TAR).is_file():
            return _cifar_from_tar(folder / _CIFAR_TAR, split)
    target = _download_missing("cifar10", [_CIFAR_TAR], dirs, download, progress)
    return _cifar_from_tar(target / _CIFAR_TAR, split)


def _read_cifar_file(path: Path) -> bytes:
    size = path.stat().st_size
    if size == 0 or size % _CIFAR_RECORD:
        raise DataError(
            f"{path} has {size} bytes, not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records "
            "(truncated?); replace it"
        )
    return path.read_bytes()


def _cifar_from_tar(tar_path: Path, split: str) -> ImageData:
    needed = _CIFAR_FILES[split]
    blobs: dict[str, bytes] = {}
    meta_text = None
    fix = "replace it (or delete it to download it again)"
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile() or (base not in needed and base != "batches.meta.txt"):
                    continue
                if base == "batches.meta.txt":
                    meta_text = tar.extractfile(member).read(_META_MAX_BYTES)
                    continue
                if member.size == 0 or member.size % _CIFAR_RECORD:
                    raise DataError(
                        f"{tar_path}: {member.name} has {member.size} bytes, not a whole number of "
                        f"{_CIFAR_RECORD}-byte CIFAR-10 records; {fix}"
                    )
                if member.size > _IDX_MAX_BYTES:
                    raise DataError(f"{tar_path}: {member.name} claims {member.size} bytes, implausibly many; {fix}")
                data = _read_at_most(tar.extractfile(member), member.size)  # grows with the data, not the claim
                if len(data) != member.size:
                    raise DataError(f"{tar_path}: {member.name} is truncated; {fix}")
                blobs[base] = data
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise DataError(f"cannot read {tar_path}: {_reason(e)} (corrupt or truncated); {fix}") from e
    missing = [f for f in needed if f not in blobs]
    if missing:
        raise DataError(f"{tar_path} lacks {', '.join(missing)}; {fix}")
    return _cifar_data(blobs, needed, meta_text, split, tar_path)


def _read_at_most(f, size: int) -> bytes:
    """Up to `size` bytes of `f`, read in chunks so memory follows what is really there."""
    buf = bytearray()
    while len(buf) < size:
        chunk = f.read(min(_CHUNK * 16, size - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _cifar_data(blobs: dict[str, bytes], order: Iterable[str], meta_text, split: str, where: Path) -> ImageData:
    records = np.concatenate([np.frombuffer(blobs[f], dtype=np.uint8).reshape(-1, _CIFAR_RECORD) for f in order])
    labels = records[:, 0].astype(np.int64)
    images = np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    classes = list(_CIFAR_CLASSES)
    if meta_text is not None:
        names = [line.strip() for line in meta_text.decode("utf-8", "replace").splitlines() if line.strip()]
        if names:
            classes = names
    if labels.max() >= len(classes):
        raise DataError(f"{where}: label {int(labels.max())} has no class name ({len(classes)} classes); replace it")
    return ImageData(images, labels, classes, f"cifar10:{split}")


# ---------------------------------------------------------------------------------------------
# downloads
# ---------------------------------------------------------------------------------------------
class _DownloadFailed(Exception):
    pass


def _download_missing(name: str, files: list[str], dirs: list[Path], download: bool, progress: bool) -> Path:
    """Download `files` of dataset `name` into the first writable data dir; return its dataset folder."""
    folder_name = _FOLDERS[name]
    shown = dirs[0] / folder_name
    head = (
        f"{name} not found: place {', '.join(files)} in {shown}{os.sep} "
        "(or pass --data-dir / set CONVAE_DATA)"
    )
    if not download:
        raise DataError(head)
    target = None
    for d in dirs:
        folder = d / folder_name
        existed = folder.is_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            target = folder
            break
    if target is None:
        raise DataError(f"{head}; download failed: none of {', '.join(map(str, dirs))} is writable")
    base = os.environ.get("CONVAE_DOWNLOAD_URL")
    bases = [f"{base.rstrip('/')}/{folder_name}/"] if base else list(MIRRORS[name])
    for fname in files:
        dest = target / fname
        if dest.is_file():
            continue
        md5 = CHECKSUMS.get(name, {}).get(fname)
        errors = []
        for b in bases:
            url = b + fname
            try:
                _fetch(url, dest, md5, progress)
                break
            except _DownloadFailed as e:
                errors.append(str(e))
        else:
            if not existed:  # leave no empty dataset folder behind
                try:
                    target.rmdir()
                except OSError:
                    pass
            reason = "; ".join(errors) or "no download source"
            raise DataError(f"{head}; download failed: {reason}".replace("\n", " "))
    return target


def _fetch(url: str, dest: Path, md5: str | None, progress: bool) -> None:
    """Download `url` to `dest` through a temporary file, renamed only when the MD5 matches."""
    from tqdm.auto import tqdm

    if not md5:
        raise _DownloadFailed(f"no checksum known for {dest.name}")
    try:
        with atomic_path(dest) as tmp:
            h = hashlib.md5()
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            got = h.hexdigest()
            if got != md5.lower():
                raise _DownloadFailed(f"checksum mismatch for {dest.name} from {url} (md5 {got}, expected {md5})")
    except _DownloadFailed:
        raise
    except urllib.error.HTTPError as e:
        raise _DownloadFailed(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise _DownloadFailed(f"{url}: {e.reason}") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _DownloadFailed(f"{url}: {_reason(e)}") from e


# ---------------------------------------------------------------------------------------------
# .npy / .npz
# ---------------------------------------------------------------------------------------------
def _npy_header(fp, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of an .npy stream, which is left at the start of the data."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_NPY_MAX_HEADER)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_NPY_MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as e:  # numpy parses the header text with ast/tokenize: any of their errors
        raise DataError(f"cannot read {where}: not a valid .npy array ({_reason(e)})") from e
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_npy_size(fp, available: int, where: str) -> None:
    """The header of the .npy stream `fp` promises no more data than the `available` bytes."""
    start = fp.tell()
    shape, dtype = _npy_header(fp, where)
    if dtype.hasobject:
        raise DataError(f"{where} holds an object array, which convae does not load; save a numeric array")
    promised = math.prod(shape) * dtype.itemsize
    there = available - (fp.tell() - start)
    if promised > there:
        raise DataError(
            f"{where}: the header promises shape {shape} of {dtype} ({promised:,} bytes) but only {max(there, 0):,} "
            "bytes follow; the file is truncated or corrupt"
        )


def _check_npz_member(zf: zipfile.ZipFile, name: str, where: str) -> None:
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(info.compress_size, 1) * _ZIP_MAX_RATIO:
        raise DataError(
            f"{where}: member {name} claims {info.file_size:,} bytes from {info.compress_size:,} compressed "
            "(a zip bomb?); save it again with np.savez"
        )
    with zf.open(name) as f:
        _check_npy_size(f, info.file_size, where)


def _np_load(path: Path):
    try:
        if not zipfile.is_zipfile(path):  # an .npy: its header must fit the file's size
            with open(path, "rb") as f:
                _check_npy_size(f, os.fstat(f.fileno()).st_size, str(path))
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path} holds an object array, which convae does not load; save a numeric array") from e
        raise DataError(f"cannot read {path}: {_reason(e)}") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError, RuntimeError) as e:
        raise DataError(f"cannot read {path}: {_reason(e)}") from e


def _load_npy(path: Path) -> ImageData:
    arr = _np_load(path)
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise DataError(f"{path} is an .npz archive, not an .npy array; name it .npz")
    images = _to_uint8_nhwc(arr, str(path))
    labels = classes = None
    sibling = path.with_name(path.stem + ".labels.npy")
    if sibling.is_file():
        raw = _np_load(sibling)
        if not isinstance(raw, np.ndarray):
            raw.close()
            raise DataError(f"{sibling} is an .npz archive, not an .npy array of labels; save it with np.save")
        labels, classes = _check_labels(raw, len(images), str(sibling))
    return ImageData(images, labels, classes, str(path))


def _load_npz(path: Path) -> ImageData:
    npz = _np_load(path)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"cannot read {path}: not an .npz archive")
    with npz:
        keys = list(npz.files)
        key = next((k for k in ("images", "x", "X") if k in keys), None)
        if key is None and len(keys) == 1:
            key = keys[0]
        if key is None:
            raise DataError(
                f"{path}: no images found: store them under 'images' (or 'x'), found keys {', '.join(keys) or 'none'}"
            )
        label_key = next((k for k in ("labels", "y", "Y") if k in keys and k != key), None)
        try:
            members = set(npz.zip.namelist())
            for k in (key, label_key):
                if k is not None:
                    _check_npz_member(npz.zip, k + ".npy" if k + ".npy" in members else k, f"{path} [{k}]")
            arr = npz[key]
            raw_labels = npz[label_key] if label_key else None
            for k, value in ((key, arr), (label_key, raw_labels)):
                if k is not None and not isinstance(value, np.ndarray):
                    raise DataError(f"{path} [{k}]: not an array; save the images with np.savez")
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise DataError(
                    f"{path} holds an object array, which convae does not load; save a numeric array"
                ) from e
            raise DataError(f"cannot read {path}: {_reason(e)}") from e
        except DataError:
            raise
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError, RuntimeError) as e:
            raise DataError(f"cannot read {path}: {_reason(e)}") from e
    images = _to_uint8_nhwc(arr, f"{path} [{key}]")
    labels = classes = None
    if raw_labels is not None:
        labels, classes = _check_labels(raw_labels, len(images), f"{path} [{label_key}]")
    return ImageData(images, labels, classes, str(path))


# ---------------------------------------------------------------------------------------------
# folders of images
# ---------------------------------------------------------------------------------------------
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _reason(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ") or type(e).__name__
    return text


def _scan(root: Path) -> list[Path]:
    found = []

    def unreadable(e: OSError) -> None:  # os.walk would skip such a folder silently
        if Path(e.filename or "") != root:
            warnings.warn(f"skipped folder {e.filename}: {e.strerror or e}", SkippedFileWarning, stacklevel=4)

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / fn)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


@contextlib.contextmanager
def _open_regular(path: str | os.PathLike):
    """Open `path` for reading only if it is a regular, non-empty file.

    Opened non-blocking and checked on the open descriptor, so a FIFO, a device or a socket
    named like an image is refused at once (never waited on), with no race between check and open.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(
                st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file"
            raise ValueError(f"not a regular file ({kind})")
        if st.st_size == 0:
            raise ValueError("empty file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def _probe(path: Path) -> tuple[tuple[int, int], bool]:
    """((height, width) after EXIF orientation, is_colour), reading only the header."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open_regular(path) as f, Image.open(f) as im:
            w, h = im.size
            if im.mode in _GRAY_MODES or im.mode in _16BIT_MODES:
                colour = False
            elif im.mode in ("P", "PA"):
                pal = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
                colour = bool(len(pal)) and not ((pal[:, 0] == pal[:, 1]) & (pal[:, 1] == pal[:, 2])).all()
            else:
                colour = True
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return (h, w), colour


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL image -> 8-bit "L" (channels 1) or "RGB" (channels 3); transparency over white."""
    mode = im.mode
    if mode in _16BIT_MODES or mode == "I":
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        im = Image.fromarray(a.astype(np.uint8))
    elif mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        if a.size and a.max() <= 1.0:
            a = a * 255
        im = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8))
    elif mode in ("RGBA", "LA", "PA") or (mode in ("P", "RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _fit(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers `size` (H, W), keeping the aspect ratio, then crop the centre."""
    th, tw = size
    w, h = im.size
    if (h, w) == (th, tw):
        return im
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return im.crop((left, top, left + tw, top + th))


def _decode(path: str | os.PathLike, size: tuple[int, int], channels: int) -> np.ndarray:
    # Runs in threads: the bomb limit is checked by hand, as warnings.catch_warnings is not thread-safe.
    with _open_regular(path) as f, Image.open(f) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.size[0] * im.size[1] > limit:
            raise ValueError(f"image of {im.size[0]}x{im.size[1]} pixels exceeds the limit of {limit} (decompression bomb?)")
        im.load()  # first frame of an animation
        im = ImageOps.exif_transpose(im)
        im = _fit(_to_mode(im, channels), size)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _load_folder(
    root: Path, size: tuple[int, int] | None, channels: int | None, progress: bool, max_memory_bytes: int
) -> ImageData:
    from tqdm.auto import tqdm

    files = _scan(root)
    if not files:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
            "check the path"
        )
    skipped: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}
    any_colour = False
    for i, p in enumerate(tqdm(files, desc="scanning", unit="file", disable=not progress)):
        try:
            sizes[i], colour = _probe(p)
            any_colour |= colour
        except Exception as e:  # any unreadable file is skipped, never fatal
            skipped[i] = _reason(e)

    if size is None and sizes:
        distinct = set(sizes.values())
        if len(distinct) > 1:
            examples = ", ".join(f"{h}x{w}" for h, w in sorted(distinct)[:3])
            raise DataError(
                f"images in {root} have {len(distinct)} different sizes (e.g. {examples}); "
                "pass --image-size (image_size=) to resize them"
            )
        size = next(iter(distinct))
    if channels is None:
        channels = 3 if any_colour else 1

    candidates = [i for i in range(len(files)) if i not in skipped]
    h, w = size if size is not None else (1, 1)
    lazy = len(candidates) * h * w * channels > max_memory_bytes
    workers = max(1, min(8, os.cpu_count() or 1))
    out = None if lazy else np.empty((len(candidates), h, w, channels), dtype=np.uint8)

    def work(k: int):
        path = str(files[candidates[k]])
        try:
            arr = _decode(path, size, channels)  # decoded even when lazy: bad files are found now
            if out is not None:
                out[k] = arr
            return None
        except Exception as e:
            return _reason(e)

    ok = np.ones(len(candidates), dtype=bool)
    if candidates:
        pool = concurrent.futures.ThreadPoolExecutor(workers)
        try:
            results = pool.map(work, range(len(candidates)), chunksize=16)
            desc = "checking" if lazy else "decoding"
            for k, reason in enumerate(tqdm(results, total=len(candidates), desc=desc, disable=not progress)):
                if reason is not None:
                    skipped[candidates[k]] = reason
                    ok[k] = False
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: do not decode the rest first
            raise
        pool.shutdown()

    for i in sorted(skipped):
        warnings.warn(f"skipped {files[i]}: {skipped[i]}", SkippedFileWarning, stacklevel=3)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(files)} files in {root}", SkippedFileWarning, stacklevel=3)
    kept = [files[i] for i, good in zip(candidates, ok) if good]
    if not kept:
        raise DataError(f"none of the {len(files)} image files in {root} could be read; see the warnings")

    if lazy:
        images: np.ndarray | LazyImages = LazyImages(kept, size, channels)
    else:
        images = out if ok.all() else out[ok]

    rel = [p.relative_to(root).parts for p in kept]
    labels = classes = None
    if all(len(parts) > 1 for parts in rel):
        classes = sorted({parts[0] for parts in rel})
        index = {c: k for k, c in enumerate(classes)}
        labels = np.array([index[parts[0]] for parts in rel], dtype=np.int64)
    return ImageData(images, labels, classes, str(root))
