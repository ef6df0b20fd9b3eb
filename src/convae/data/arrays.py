"""Arrays of images: the layout rule, conversions, and .npy/.npz files read with bounded memory."""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .._memory import MEMORY_ENV, available_bytes
from ..errors import DataError
from .containers import ImageData, error_reason
from .folders import _fit

_MAX_LABEL = 1 << 20  # class indices beyond this are not class indices
_ZIP_MAX_RATIO = 1100  # deflate cannot compress more than ~1032:1; a member claiming more is a zip bomb
_NPY_MAX_HEADER = 1 << 16


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
        raise DataError(f"{name}: cannot be read as an array of images ({error_reason(e)})") from e
    return _to_uint8_nhwc(arr, name)


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
                f"{where}: float images must lie in [0, 1], found {lo:g}..{hi:g}; divide by 255 or save as uint8"
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
    _check_converted_size(data.name, images.shape, size, channels)
    if channels is not None:
        images = _convert_channels(images, channels)
    if size is not None:
        images = _resize_array(images, size)
    data.images = images
    return data


def _check_converted_size(name: str, shape, size: tuple[int, int] | None, channels: int | None) -> None:
    """DataError when the images resized to `size` (with `channels`) would not fit the memory
    budget (``convae._memory.available_bytes``): found before the array is allocated."""
    n, h, w, c = shape
    if (size is None or tuple(size) == (h, w)) and channels in (None, c):
        return  # nothing converted, nothing allocated
    h, w = size or (h, w)
    needed = n * h * w * (channels or c)
    budget, source = available_bytes()
    if budget is not None and needed > budget:
        raise DataError(
            f"{name}: {n:,} images of {h}x{w}x{channels or c} take {needed / (1 << 30):,.1f} GiB, more than the "
            f"{budget / (1 << 30):,.1f} GiB of {source}; choose a smaller --image-size (or set ${MEMORY_ENV})"
        )


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
        raise DataError(f"cannot read {where}: not a valid .npy array ({error_reason(e)})") from e
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


def check_npz_array(npz, key: str, where: str) -> None:
    """DataError unless the array `key` of the open NpzFile `npz` promises no more bytes than its
    member holds (and no more than deflate can give): checked before np.load inflates it."""
    members = set(npz.zip.namelist())
    try:
        _check_npz_member(npz.zip, key + ".npy" if key + ".npy" in members else key, where)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError, RuntimeError) as e:
        raise DataError(f"cannot read {where}: {error_reason(e)}") from e


def _np_load(path: Path):
    try:
        if not zipfile.is_zipfile(path):  # an .npy: its header must fit the file's size
            with open(path, "rb") as f:
                _check_npy_size(f, os.fstat(f.fileno()).st_size, str(path))
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path} holds an object array, which convae does not load; save a numeric array") from e
        raise DataError(f"cannot read {path}: {error_reason(e)}") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError, RuntimeError) as e:
        raise DataError(f"cannot read {path}: {error_reason(e)}") from e


def load_checked(path: str | os.PathLike):
    """np.load of an .npy or .npz with every size its headers claim checked against the file
    first (no pickles); a DataError naming the file otherwise."""
    return _np_load(Path(path))


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
            raise DataError(f"cannot read {path}: {error_reason(e)}") from e
        except DataError:
            raise
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError, RuntimeError) as e:
            raise DataError(f"cannot read {path}: {error_reason(e)}") from e
    images = _to_uint8_nhwc(arr, f"{path} [{key}]")
    labels = classes = None
    if raw_labels is not None:
        labels, classes = _check_labels(raw_labels, len(images), f"{path} [{label_key}]")
    return ImageData(images, labels, classes, str(path))
