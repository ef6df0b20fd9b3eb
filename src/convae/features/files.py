"""Features written to disk: resumable extraction into .npy/.npz/.parquet, and reading it back.

:func:`extract_to_file` writes features batch by batch, so memory stays flat however many
images there are, and an interrupted extraction resumes where it stopped. Each row's source
(index, path, label, class: :class:`convae.data.SourceIndex`) goes beside the features as
``OUT.index.csv``, or into the Parquet file as its first columns. Under torchrun each rank
writes a shard (``OUT.rank0-of-2.npy``); :func:`load_features` reads shards as one result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from .._io import DISK_FULL, _fsync_dir, _mode_for, atomic_open, atomic_path, atomic_write_text, make_folders
from .._version import __version__
from ..data.arrays import check_npz_array, load_checked
from ..data.index import SourceIndex, read_index_csv, write_index_csv
from ..errors import ConfigError, StorageError
from ..outputs import (
    OutputError,
    check_side_files,
    create_exclusive,
    lock_output,
    open_existing_for_update,
    regular_file_kind,
)
from ..progress import progress_bar
from ..readback import ReadBackError, read_json
from .extractor import FeatureExtractor

DTYPES: tuple[str, ...] = ("float32", "float16")
#: Output formats, by file suffix.
FORMATS: tuple[str, ...] = ("npy", "npz", "parquet")
# The progress file is rewritten (with an fsync) at most this often: resuming redoes at most
# this much work, and a fast GPU extraction is not slowed by a sync per batch.
_PROGRESS_EVERY_S = 0.5
_PROGRESS_MAX_BYTES = 4096  # a progress record is one short line


@dataclass
class ExtractResult:
    path: Path
    labels_path: Path | None  # OUT.labels.npy; None for .npz/.parquet (labels inside) or unlabelled data
    shape: tuple[int, int]
    dtype: str
    resumed_from: int  # rows an interrupted extraction had already written
    feature_names: list[str]
    index_path: Path | None = None  # OUT.index.csv; None for .parquet (the index is in its first columns)


class LoadedFeatures(tuple):
    """``(features, labels)``, as :func:`load_features` always returned, that also knows each
    row's source: ``.index`` (a :class:`convae.data.SourceIndex`: index, path, label, class).

    ``X, y = load_features(path)`` keeps working; ``load_features(path).index.paths`` names the
    file of each row.
    """

    _index: SourceIndex

    def __new__(cls, features: np.ndarray, labels: np.ndarray | None, index: SourceIndex):
        self = super().__new__(cls, (features, labels))
        self._index = index
        return self

    # named like the file it comes from (OUT.index.csv); a pair's tuple.index(value) is no loss
    @property
    def index(self) -> SourceIndex:  # type: ignore[override]
        return self._index

    @property
    def features(self) -> np.ndarray:
        return self[0]

    @property
    def labels(self) -> np.ndarray | None:
        return self[1]


def partial_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(features being written, progress record) of an unfinished extraction to `out`."""
    out = Path(out)
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".progress.json")


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the weights and buffers: which model made a file of features."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_digest(images) -> str:
    """Shape and a few sample images: cheap, and catches a different dataset of the same size."""
    n = len(images)
    h = hashlib.sha256(repr(tuple(int(s) for s in images.shape)).encode())
    for i in sorted({0, n // 2, n - 1}):
        h.update(np.ascontiguousarray(images[i]).tobytes())
    return h.hexdigest()


def _read_progress(path: Path) -> dict | None:
    """The progress record at `path`, or None: a record convae cannot have written (a FIFO, a
    huge or malformed file) only means the extraction starts over, never a hang or a crash."""
    if not os.path.lexists(path):
        return None
    try:
        state = read_json(path, _PROGRESS_MAX_BYTES, "a progress record")
    except ReadBackError:
        return None
    return state if isinstance(state, dict) else None


def _data_offset(path: Path, shape: tuple[int, int], dtype: np.dtype) -> int | None:
    """Where the rows of the .npy file `path` start, if it holds a C-order `shape` array of `dtype`."""
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            found_shape, fortran, found_dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError):
        return None
    size_ok = path.stat().st_size == offset + int(np.prod(shape)) * dtype.itemsize
    return offset if (found_shape, fortran, found_dtype, size_ok) == (shape, False, dtype, True) else None


def _open_partial(out: Path, partial: Path, progress: Path, fingerprint: str, shape, dtype) -> tuple[int, int]:
    """(offset of the rows in the partial .npy, rows already done): resumed when it matches, else started anew.

    Call holding the output's lock. Something at OUT.partial that convae cannot have left there
    (a symlink, a FIFO, a file with other hard links) is refused, never opened: writing the rows
    would go through it into another file.
    """
    kind = regular_file_kind(partial)
    if kind in ("a symlink", "not a regular file"):
        raise OutputError(f"{partial}: {kind}, where convae keeps an unfinished extraction; remove it and run again")
    state = _read_progress(progress)
    if kind == "file" and state and state.get("fingerprint") == fingerprint:
        offset, rows = _data_offset(partial, shape, dtype), state.get("rows_done")
        if offset is not None and isinstance(rows, int) and 0 <= rows <= shape[0]:
            return offset, rows
    make_folders(partial.parent)
    # another extraction's leftover, or a name shared with another file (a hard link, which
    # writing in place would change): the name goes, the rows go to a file of their own
    partial.unlink(missing_ok=True)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    # created exclusively, with the mode OUT has (it becomes OUT), else the umask's
    with os.fdopen(create_exclusive(partial, _mode_for(out)), "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)  # the header np.save writes
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)  # rows to come: a sparse file
    _write_progress(progress, fingerprint, 0, shape[0])
    return offset, 0


def _write_progress(path: Path, fingerprint: str, rows_done: int, rows: int) -> None:
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "rows_done": rows_done, "rows": rows}) + "\n")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def extract_to_file(
    extractor: FeatureExtractor,
    images,
    out: str | os.PathLike,
    *,
    labels: np.ndarray | None = None,
    index: SourceIndex | None = None,
    dtype: str = "float32",
    source: str = "",
    workers: int | None = None,
    progress: bool = False,
) -> ExtractResult:
    """Write the features of `images` to `out` (.npy, .npz or .parquet), with each row's source.

    Rows go into ``OUT.partial`` (an .npy file) batch by batch, with a progress record
    ``OUT.progress.json`` that names what is being extracted (model weights, data, its index,
    layers, pooling, dtype). Run again after an interruption, it continues from the last
    recorded row; the finished file is renamed into place, so a complete OUT is always whole.

    Parameters
    ----------
    extractor : FeatureExtractor
        The model, layers and pooling.
    images : array, LazyImages or ImageData
        uint8 (N, H, W, C) images of the model's shape; an ImageData brings its labels, its
        source index (paths of a folder's files) and its name.
    out : path
        ``.npy`` (labels go to ``OUT.labels.npy``), ``.npz`` (arrays ``features``, ``labels``)
        or ``.parquet`` (columns index, path, label, class, then one per feature, named as
        ``extractor.feature_names``). Beside .npy and .npz, ``OUT.index.csv`` says where each
        row came from (:class:`convae.data.SourceIndex`).
    labels : array, optional
        One per image.
    index : SourceIndex, optional
        Each image's source (default: rows 0..N-1 with `labels`).
    dtype : {"float32", "float16"}
    source : str
        Names the data (e.g. the dataset spec) in the progress record.

    Returns
    -------
    ExtractResult
        Where the features went, their shape and dtype, and the row a resumed run started at.

    Examples
    --------
    >>> ex = FeatureExtractor(convae.load_model("runs/mnist")[0], "stage2", "grid4")  # doctest: +SKIP
    >>> extract_to_file(ex, convae.load_dataset("./photos", image_size=64), "feats.parquet")  # doctest: +SKIP
    """
    out = Path(out)
    images, labels, index, source = _unpack(images, labels, index, source)
    _check_request(out, dtype, len(images), labels, index, source)
    shape = (len(images), extractor.dim)
    fingerprint = _fingerprint(extractor, images, index, source, shape, dtype)
    partial, progress_path = partial_paths(out)
    with lock_output(out):  # a second extraction to OUT is refused: rows of two models never mix
        check_side_files(out, side_files(out), previous=[partial])
        offset, done = _open_partial(out, partial, progress_path, fingerprint, shape, np.dtype(dtype))
        resumed_from = done
        try:
            _write_rows(extractor, images, partial, offset, done, dtype, progress_path, fingerprint, workers, progress)
        except OSError as e:
            if isinstance(e, StorageError) or e.errno not in DISK_FULL:
                raise
            raise _disk_full(partial, e) from e
        labels_path, index_path = _finish(out, partial, labels, index, extractor.feature_names, source)
        progress_path.unlink(missing_ok=True)
    return ExtractResult(out, labels_path, shape, dtype, resumed_from, extractor.feature_names, index_path)


def _disk_full(partial: Path, e: OSError) -> StorageError:
    """A full disk while rows land: one line naming the file and both ways on."""
    return StorageError(
        f"cannot write {partial}: no space left on device; free some space and run the same command "
        f"again to resume, or delete {partial.name} to give its space back",
        e.errno,
        str(partial),
    )


def _unpack(images, labels, index: SourceIndex | None, source: str):
    """(images, labels, index, source) from an ImageData or an array and what was given beside it."""
    if hasattr(images, "source_index"):  # an ImageData
        data = images
        labels = data.labels if labels is None else labels
        index = data.source_index() if index is None else index
        source = source or data.name
        images = data.images
    if index is None:
        index = SourceIndex.of_rows(len(images), labels)
    elif labels is not None and index.labels is None:
        index = SourceIndex(index.index, index.paths, labels, index.classes)
    return images, labels, index, source


def output_format(out: str | os.PathLike) -> str:
    """npy, npz or parquet, from the suffix of `out`; any other suffix is a ConfigError."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ConfigError(f"output {out}: name it .npy (with OUT.labels.npy beside it), .npz or .parquet")
    return suffix


def _check_request(out: Path, dtype: str, n: int, labels, index: SourceIndex, source: str) -> None:
    output_format(out)
    if out.is_dir():  # found now, not after all the rows are written
        raise OutputError(f"output {out}: is a folder; give a file name")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if n == 0:
        raise ConfigError(f"{source or 'the data'}: no images to extract features from")
    if labels is not None and len(labels) != n:
        raise ConfigError(f"labels: {len(labels)} for {n} images")
    if len(index) != n:
        raise ConfigError(f"index: {len(index)} rows for {n} images")


def _index_digest(index: SourceIndex) -> str:
    """The rows' ids and paths: a resume continues only over the same files in the same order."""
    h = hashlib.sha256(index.index.tobytes())
    for p in index.paths or ():
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _fingerprint(
    extractor: FeatureExtractor, images, index: SourceIndex, source: str, shape: tuple[int, int], dtype: str
) -> str:
    """What is being extracted: a resume continues only the same extraction."""
    record = {
        "model": model_digest(extractor.model),
        "data": [source, _data_digest(images), _index_digest(index)],
        "blocks": [[b.layer, b.pool] for b in extractor.blocks],
        "shape": shape,
        "dtype": dtype,
        "bf16_products": extractor.bf16,
        "convae": __version__,
    }
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def _write_rows(
    extractor,
    images,
    partial: Path,
    offset: int,
    done: int,
    dtype: str,
    progress_path: Path,
    fingerprint: str,
    workers: int | None,
    progress: bool,
) -> None:
    """Rows done.. of the features into the partial .npy file, recording progress as they land."""
    n = len(images)
    row_bytes = extractor.dim * np.dtype(dtype).itemsize
    # Plain positioned writes, not a memmap: written rows sit in the page cache, never in this
    # process's memory, however large the file grows.
    with os.fdopen(open_existing_for_update(partial), "r+b") as f, progress_bar(progress, n, initial=done) as bar:
        last_sync = time.monotonic()
        for row, feats in extractor.batches(images, done, workers=workers):
            f.seek(offset + row * row_bytes)
            f.write(np.ascontiguousarray(feats, dtype=dtype).data)
            done = row + len(feats)
            bar.update(len(feats))
            if time.monotonic() - last_sync >= _PROGRESS_EVERY_S or done == n:
                f.flush()
                os.fsync(f.fileno())  # the rows reach the disk before the record that counts them
                _write_progress(progress_path, fingerprint, done, n)
                last_sync = time.monotonic()


def labels_path_of(out: str | os.PathLike) -> Path:
    """feats.npy -> feats.labels.npy (where an .npy extraction's labels go)."""
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".labels.npy")


def side_files(out: str | os.PathLike) -> list[Path]:
    """The files an extraction to `out` writes beside it (none for Parquet: all in one file)."""
    kind = output_format(out)
    if kind == "parquet":
        return []
    return [index_path_of(out), *([labels_path_of(out)] if kind == "npy" else [])]


def index_path_of(out: str | os.PathLike) -> Path:
    """feats.npy -> feats.index.csv (where the rows' sources go)."""
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".index.csv")


def _finish(
    out: Path, partial: Path, labels, index: SourceIndex, names: list[str], source: str
) -> tuple[Path | None, Path | None]:
    """The finished partial file put in place as `out`, with its labels and index: (labels file, index file)."""
    kind = output_format(out)
    if kind == "parquet":
        from .parquet import write_parquet  # pyarrow only when asked for

        write_parquet(out, np.load(partial, mmap_mode="r"), index, names, source)
        partial.unlink()
        return None, None
    index_path = index_path_of(out)
    write_index_csv(index_path, index)  # before the features: a finished OUT always has its index
    if kind == "npy":
        labels_path = labels_path_of(out)
        if labels is not None:
            _save_npy(labels_path, np.asarray(labels))
        else:  # an earlier output's labels (check_side_files) would be read back with these rows
            labels_path.unlink(missing_ok=True)
        os.replace(partial, out)
        _fsync_dir(out.parent)
        return (labels_path if labels is not None else None), index_path
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        # the layout np.savez writes; the finished .npy is copied in chunks, not loaded
        with zf.open("features.npy", "w", force_zip64=True) as dst, open(partial, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        if labels is not None:
            with zf.open("labels.npy", "w", force_zip64=True) as dst:
                np.lib.format.write_array(dst, np.asarray(labels))
    partial.unlink()
    return None, index_path


# -- sharded extraction (one shard per torchrun rank) ----------------------------------------
_SHARD_RE = r"\.rank(\d+)-of-(\d+)$"


class RowRange:
    """Rows [start, stop) of an image array or LazyImages, without decoding or copying them."""

    def __init__(self, images, start: int, stop: int):
        self.images, self.start, self.stop = images, start, stop
        self.shape = (stop - start, *images.shape[1:])
        self.dtype = np.uint8

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            if not -len(self) <= i < len(self):
                raise IndexError(i)
            return self.images[self.start + int(i) % len(self)]
        return self.images[np.arange(self.start, self.stop)[i]]


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, near-equal rows of rank `rank`: shards concatenate back in order."""
    return n * rank // world_size, n * (rank + 1) // world_size


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """features.npy -> features.rank0-of-2.npy"""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}-of-{world_size}{out.suffix}")


def shard_images(images, labels, rank: int, world_size: int):
    start, stop = shard_range(len(images), rank, world_size)
    part = images[start:stop] if isinstance(images, np.ndarray) else RowRange(images, start, stop)
    return part, (None if labels is None else labels[start:stop])


def _shards_of(path: Path) -> list[Path]:
    found: dict[int, dict[int, Path]] = {}
    for p in path.parent.glob(f"{path.stem}.rank*-of-*{path.suffix}"):
        m = re.search(_SHARD_RE, p.name[: -len(path.suffix)] if path.suffix else p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        return []
    if len(found) > 1:
        raise ConfigError(
            f"{path}: shards of several extractions ({', '.join(f'of-{w}' for w in sorted(found))}); remove the stale ones"
        )
    world, shards = next(iter(found.items()))
    missing = sorted(set(range(world)) - set(shards))
    if missing:
        raise ConfigError(
            f"{path}: shard(s) {', '.join(map(str, missing))} of {world} are missing; run the extraction again to finish them"
        )
    return [shards[r] for r in range(world)]


def _load_one(path: Path) -> LoadedFeatures:
    """One feature file; numpy's and zipfile's errors on a damaged one are one line naming it."""
    try:
        return _read_one(path)
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"cannot read {path}: {reason}") from e


def _read_one(path: Path) -> LoadedFeatures:
    kind = path.suffix.lower()
    if kind == ".parquet":
        from .parquet import read_parquet

        features, index = read_parquet(path)
        return LoadedFeatures(features, index.labels, index)
    if kind == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "features" not in z:
                raise ConfigError(f"{path}: no 'features' array; was it written by convae extract?")
            for key in ("features", "labels"):  # sizes checked before inflating, as for datasets
                if key in z:
                    check_npz_array(z, key, f"{path} [{key}]")
            features, labels = z["features"], (z["labels"] if "labels" in z else None)
    else:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
        labels_path = path.with_name(path.name[: -len(".npy")] + ".labels.npy")
        labels = load_checked(labels_path) if labels_path.is_file() else None
        if labels is not None and not isinstance(labels, np.ndarray):
            labels.close()
            raise ConfigError(f"{labels_path}: an .npz archive, not labels; extract again")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(features)):
        count = labels.shape[0] if labels.ndim == 1 else f"shape-{labels.shape}"
        raise ConfigError(f"{path}: {count} labels for {len(features)} rows of features; extract again")
    return LoadedFeatures(features, labels, _index_beside(path, len(features), labels))


def _index_beside(path: Path, n: int, labels) -> SourceIndex:
    """OUT.index.csv, checked against the features; rows 0..n-1 for files written before convae wrote one."""
    csv_path = index_path_of(path)
    if not os.path.lexists(csv_path):  # anything else there is read back, and refused if not an index
        return SourceIndex.of_rows(n, labels)
    index = read_index_csv(csv_path, rows=n)
    if len(index) != n:
        raise ConfigError(f"{csv_path}: {len(index)} rows for the {n} rows of {path.name}; extract again")
    return index


def is_feature_file(spec: str | os.PathLike) -> bool:
    """A finished extraction (a 2-D .npy/.npz, a .parquet, or a complete set of rank shards) at `spec`."""
    path = Path(spec)
    if path.suffix.lower() not in (".npy", ".npz", ".parquet"):
        return False
    if path.is_file():
        try:
            if path.suffix.lower() == ".parquet":
                from .parquet import is_parquet_features

                return is_parquet_features(path)
            if path.suffix.lower() == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    return "features" in z
            return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 2
        except (OSError, ValueError):
            return False
    return bool(_shards_of(path))


def load_features(path: str | os.PathLike) -> LoadedFeatures:
    """Features (N, dim), labels (or None) and each row's source, of `convae extract` output, sharded or not.

    A sharded extraction (``OUT.rank0-of-N.npy`` ...) reads as one result, in image order.

    Parameters
    ----------
    path : path
        ``OUT.npy`` (with ``OUT.labels.npy`` and ``OUT.index.csv`` beside it), ``OUT.npz``,
        ``OUT.parquet``, or the name the shards share.

    Returns
    -------
    LoadedFeatures
        The pair ``(features, labels)`` as before (the features a read-only memmap for a single
        .npy), with ``.index``: each row's index, path, label and class
        (:class:`convae.data.SourceIndex`; rows 0..N-1 for files from before convae wrote one).

    Examples
    --------
    >>> X, y = load_features("train.npy")   # doctest: +SKIP
    >>> feats = load_features("photos.npy"); feats.index.paths[:2]   # doctest: +SKIP
    ['cats/001.jpg', 'cats/002.jpg']
    """
    path = Path(path)
    if path.is_file():
        return _load_one(path)
    shards = _shards_of(path)
    if not shards:
        raise ConfigError(f"{path}: no such features file (nor shards {shard_path(path, 0, 2).name}, ...)")
    parts = [_load_one(p) for p in shards]
    features = np.concatenate([p.features for p in parts])
    labels = None if any(p.labels is None for p in parts) else np.concatenate([p.labels for p in parts])
    return LoadedFeatures(features, labels, SourceIndex.concatenate([p.index for p in parts]))
