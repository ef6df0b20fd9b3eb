"""The built-in datasets: scikit-learn's digits, MNIST and Fashion-MNIST (IDX), CIFAR-10 (binary)."""

from __future__ import annotations

import gzip
import math
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DataError
from .containers import ImageData, error_reason
from .dirs import DATASET_FOLDERS, find_data_dir
from .download import _download_missing

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")
SPLITS: tuple[str, ...] = ("train", "test")


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
_IDX_MAX_BYTES = 1 << 33  # 8 GiB: anything more is a broken header, not a dataset
_META_MAX_BYTES = 1 << 16  # batches.meta.txt: ten class names
_CHUNK = 1 << 20


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
        paths = [_existing(d / DATASET_FOLDERS[name], s) for s in stems]
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
        raise DataError(f"cannot read {path}: {error_reason(e)} (corrupt or truncated); {fix}") from e
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
        folder = d / DATASET_FOLDERS["cifar10"]
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
        raise DataError(f"cannot read {tar_path}: {error_reason(e)} (corrupt or truncated); {fix}") from e
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
