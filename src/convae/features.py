"""Features from any encoder layer: pooled, concatenated, streamed to memory or to disk.

Layer names are those of ``model.feature_info`` (``stage1.conv1`` ... ``stage2``, ``bottleneck``;
``fc1`` ... ``bottleneck`` for the dense autoencoder), or ``all``. A pooling turns a layer's
(C, H, W) maps into a vector:

    flatten   the maps as they are: C*H*W values, channel-major
    avg, max  global average / maximum of each channel: C values
    grid2/4   average over a 2x2 / 4x4 grid of regions, concatenated (spatial-pyramid style):
              C*4 / C*16 values; a map smaller than the grid keeps its own size

``stage1.conv1.split`` (any conv block's name plus ``.split``) is that block's sign-split maps:
its normalized pre-activation z as [relu(z - 0.5), relu(-z - 0.5)], 2C channels, pooled like any
layer; `all` leaves them out.

The outputs of dense layers are already global vectors, and every pooling leaves them as they are.
Blocks are concatenated layer by layer in network order, and within a layer in the order of
``POOLS``, so a feature set is the same whatever order it was asked for in. One forward pass
per batch serves every block, and it stops after the deepest layer asked for.

:func:`extract_to_file` writes features to ``.npy``/``.npz`` batch by batch, so memory stays
flat however many images there are, and an interrupted extraction resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._io import _fsync_dir, atomic_open, atomic_path, atomic_write_text
from ._memory import keep_freed_memory
from ._version import __version__
from .errors import ConfigError
from .model import SPLIT_SUFFIX

POOLS: tuple[str, ...] = ("flatten", "avg", "max", "grid2", "grid4")
_GRIDS = {"grid2": 2, "grid4": 4}
DTYPES: tuple[str, ...] = ("float32", "float16")
# The progress file is rewritten (with an fsync) at most this often: resuming redoes at most
# this much work, and a fast GPU extraction is not slowed by a sync per batch.
_PROGRESS_EVERY_S = 0.5


def split_names(value: str | Iterable[str], what: str) -> list[str]:
    """Names from "a,b" or a list, stripped; none at all is an error naming option `what`."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise ConfigError(f"{what}: give at least one name")
    return out


def resolve_layers(model: nn.Module, layers: str | Iterable[str] = "bottleneck") -> list[str]:
    """Layer names in network order, from "all", "a,b" or a list; unknown names list the valid ones."""
    asked = split_names(layers, "layers")
    if asked == ["all"]:
        return list(model.layer_names)
    valid = feature_layer_names(model)
    unknown = [name for name in asked if name not in valid]
    if unknown:
        raise ConfigError(
            f"layers: unknown layer(s) {', '.join(unknown)}: choose from all, {', '.join(valid)} "
            "(`convae layers RUN_DIR` lists them)"
        )
    return [name for name in valid if name in asked]


def feature_layer_names(model: nn.Module) -> list[str]:
    """Every layer name features accept, in network order (a conv block's sign split after it)."""
    splits = set(getattr(model, "split_layer_names", ()))
    out = []
    for name in model.layer_names:
        out.append(name)
        if name + SPLIT_SUFFIX in splits:
            out.append(name + SPLIT_SUFFIX)
    return out


def layer_shape(model: nn.Module, name: str) -> list[int]:
    """Output shape of a layer `feature_layer_names` gives: [C, H, W], or [D] for dense layers."""
    if hasattr(model, "layer_shape"):
        return model.layer_shape(name)
    return list(next(f["shape"] for f in model.feature_info if f["module"] == name))  # a timm-style model


def resolve_pools(pool: str | Iterable[str] = "flatten") -> list[str]:
    """Pooling names in the order of POOLS, from "avg", "avg,grid2" or a list."""
    asked = split_names(pool, "pool")
    unknown = [name for name in asked if name not in POOLS]
    if unknown:
        raise ConfigError(f"pool: unknown pooling {', '.join(unknown)}: choose from {', '.join(POOLS)}")
    return [name for name in POOLS if name in asked]


def pooled_shape(shape: Sequence[int], pool: str) -> tuple[int, ...]:
    """Shape of one layer's pooled features, given its output shape [C, H, W] (or [D] for dense layers)."""
    if len(shape) == 1:
        return (int(shape[0]),)
    c, h, w = (int(s) for s in shape)
    if pool == "flatten":
        return (c, h, w)
    if pool in ("avg", "max"):
        return (c,)
    g = _GRIDS[pool]
    return (c, min(g, h), min(g, w))


def pool_features(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, H, W) maps, or (N, D) vectors -> (N, F) features."""
    if x.ndim == 2:
        return x
    if pool == "flatten":
        return x.flatten(1)
    if pool == "avg":
        return x.mean((2, 3))
    if pool == "max":
        return x.amax((2, 3))
    g = _GRIDS[pool]
    cells = (min(g, x.shape[2]), min(g, x.shape[3]))
    return F.adaptive_avg_pool2d(x, cells).flatten(1)  # (N, C, gh, gw) -> (N, C*gh*gw)


def _block_names(layer: str, pool: str, shape: tuple[int, ...]) -> list[str]:
    prefix = f"{layer}/{pool}"
    if len(shape) == 1:
        return [f"{prefix}/c{c}" for c in range(shape[0])]
    cell = "y{}_x{}" if pool == "flatten" else "g{}_{}"
    c, h, w = shape
    return [f"{prefix}/c{k}_{cell.format(i, j)}" for k in range(c) for i in range(h) for j in range(w)]


@dataclass(frozen=True)
class Block:
    """One layer's pooled features, at columns start:stop of the concatenated vector."""

    layer: str
    pool: str
    shape: tuple[int, ...]
    start: int

    @property
    def name(self) -> str:
        return f"{self.layer}/{self.pool}"

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stop(self) -> int:
        return self.start + self.dim

    @property
    def columns(self) -> slice:
        return slice(self.start, self.stop)


def plan_blocks(model: nn.Module, layers="bottleneck", pool="flatten") -> list[Block]:
    """The blocks a (layers, pool) request gives on `model`, in concatenation order."""
    blocks, start = [], 0
    for layer in resolve_layers(model, layers):
        for p in resolve_pools(pool):
            shape = pooled_shape(layer_shape(model, layer), p)
            blocks.append(Block(layer, p, shape, start))
            start = blocks[-1].stop
    return blocks


def layer_table(model: nn.Module) -> list[dict]:
    """One row per encoder layer with its channels, stride, receptive field and each pooling's size."""
    info = {f["module"]: f for f in model.feature_info}
    rows = []
    for name in feature_layer_names(model):
        f = info[name.removesuffix(SPLIT_SUFFIX)]
        shape = layer_shape(model, name)
        row = dict(
            layer=name,
            shape="x".join(str(s) for s in shape),
            channels=shape[0],
            stride=f["reduction"] if f["reduction"] is not None else "-",
            receptive_field=f["receptive_field"],
        )
        for p in POOLS:
            row[p] = int(np.prod(pooled_shape(shape, p)))
        rows.append(row)
    return rows


# Per batch, the largest encoder map stays under glibc's 32 MiB mmap threshold on CPU, so
# inference reuses freed heap buffers instead of page-faulting fresh ones every batch (see
# _memory.py): the former CIFAR-10 preset's probed layers extracted at 380 images/s in batches
# of 256, 1,080-1,090 at this size (48).
_BATCH_MAP_BYTES = 24 << 20
MAX_BATCH = 256


def auto_batch_size(model: nn.Module, device: torch.device, layers: Iterable[str] = ()) -> int:
    """Images per inference batch (extraction, decoding, validation): MAX_BATCH, fewer on CPU for models with large maps.

    Counts the model's layers and, of the sign splits (computed only when asked for), `layers`'.
    """
    if device.type != "cpu":
        return MAX_BATCH
    names = [*model.layer_names, *(n for n in layers if n.endswith(SPLIT_SUFFIX))]
    largest = max(math.prod(layer_shape(model, name)) for name in names) * 4
    return int(min(MAX_BATCH, max(8, _BATCH_MAP_BYTES // largest // 8 * 8)))


def default_workers(images) -> int:
    """Decoding processes: none for arrays in memory, a few for images decoded from files."""
    return 0 if isinstance(images, np.ndarray) else min(4, os.cpu_count() or 1)


class FeatureExtractor:
    """The pooled outputs of encoder layers, concatenated into one vector per image.

    Puts `model` in eval mode on `device`. ``extractor(x)`` maps a float batch (N, C, H, W) in
    [0, 1] to (N, dim) features; :meth:`transform` and :meth:`batches` take uint8 (N, H, W, C)
    images: an array, a memmap or :class:`convae.data.LazyImages`.

    Example: ``FeatureExtractor(model, "stage2,bottleneck", "grid2").transform(images)`` gives
    columns named ``stage2/grid2/c0_g0_0`` ... (see :attr:`feature_names`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Iterable[str] = "bottleneck",
        pool: str | Iterable[str] = "flatten",
        *,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
    ):
        from .train import resolve_device

        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.blocks = plan_blocks(model, layers, pool)
        self.layers = list(dict.fromkeys(b.layer for b in self.blocks))
        self.pools = list(dict.fromkeys(b.pool for b in self.blocks))
        self.batch_size = int(batch_size) if batch_size else auto_batch_size(model, self.device, self.layers)

    @property
    def dim(self) -> int:
        return self.blocks[-1].stop

    @property
    def feature_names(self) -> list[str]:
        return [name for b in self.blocks for name in _block_names(b.layer, b.pool, b.shape)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) the model takes."""
        cfg = self.model.config
        return (*cfg.image_size, cfg.in_channels)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model.forward_intermediates(x, self.layers)
        return torch.cat([pool_features(maps[b.layer], b.pool).float() for b in self.blocks], dim=1)

    def batches(self, images, start: int = 0, *, workers: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 (B, dim) features) for images[start:], batch by batch, in order."""
        from .train import iter_uint8_batches, to_input

        shape = tuple(int(s) for s in images.shape[1:])
        if shape != self.image_shape:
            raise ConfigError(
                f"images are {'x'.join(map(str, shape))} (HxWxC) but the model takes "
                f"{'x'.join(map(str, self.image_shape))}; resize them (--image-size, --channels)"
            )
        workers = default_workers(images) if workers is None else workers
        keep_freed_memory()
        indices = np.arange(start, len(images))
        row = start
        for batch in iter_uint8_batches(images, indices, self.batch_size, workers):
            feats = self(to_input(batch, self.device, False)).cpu().numpy()
            yield row, feats
            row += len(feats)

    def transform(self, images, *, dtype=np.float32, progress: bool = False) -> np.ndarray:
        """Features of all images as one (N, dim) array (the only allocation that grows with N)."""
        out = np.empty((len(images), self.dim), dtype=dtype)
        with _progress_bar(progress, len(images), 0) as bar:
            for row, feats in self.batches(images):
                out[row : row + len(feats)] = feats
                bar.update(len(feats))
        return out


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass


# -- extraction to a file, resumable ------------------------------------------------------------
@dataclass
class ExtractResult:
    path: Path
    labels_path: Path | None  # OUT.labels.npy; None for .npz (labels inside) or unlabelled data
    shape: tuple[int, int]
    dtype: str
    resumed_from: int  # rows an interrupted extraction had already written
    feature_names: list[str]


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
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
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


def _open_partial(partial: Path, progress: Path, fingerprint: str, shape, dtype) -> tuple[int, int]:
    """(offset of the rows in the partial .npy, rows already done): resumed when it matches, else started anew."""
    state = _read_progress(progress)
    if state and state.get("fingerprint") == fingerprint:
        offset, rows = _data_offset(partial, shape, dtype), state.get("rows_done")
        if offset is not None and isinstance(rows, int) and 0 <= rows <= shape[0]:
            return offset, rows
    partial.parent.mkdir(parents=True, exist_ok=True)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(partial, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)  # the header np.save writes
        f.truncate(f.tell() + int(np.prod(shape)) * dtype.itemsize)  # rows to come: a sparse file
    _write_progress(progress, fingerprint, 0, shape[0])
    return _data_offset(partial, shape, dtype), 0


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
    dtype: str = "float32",
    source: str = "",
    workers: int | None = None,
    progress: bool = False,
) -> ExtractResult:
    """Write the features of `images` to `out` (.npy, plus OUT.labels.npy; or .npz with both).

    Rows go into ``OUT.partial`` (an .npy file) batch by batch, with a progress record
    ``OUT.progress.json`` that names what is being extracted (model weights, data, layers,
    pooling, dtype). Run again after an interruption, it continues from the last recorded row;
    the finished file is renamed into place, so a complete OUT is always whole. `source` names
    the data (e.g. the dataset spec) for that record.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ConfigError(f"output {out}: name it .npy (with OUT.labels.npy beside it) or .npz")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    n = len(images)
    if n == 0:
        raise ConfigError(f"{source or 'the data'}: no images to extract features from")
    if labels is not None and len(labels) != n:
        raise ConfigError(f"labels: {len(labels)} for {n} images")
    shape = (n, extractor.dim)
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "model": model_digest(extractor.model),
                "data": [source, _data_digest(images)],
                "blocks": [[b.layer, b.pool] for b in extractor.blocks],
                "shape": shape,
                "dtype": dtype,
                "convae": __version__,
            }
        ).encode()
    ).hexdigest()

    partial, progress_path = partial_paths(out)
    offset, done = _open_partial(partial, progress_path, fingerprint, shape, np.dtype(dtype))
    resumed_from = done
    row_bytes = extractor.dim * np.dtype(dtype).itemsize
    # Plain positioned writes, not a memmap: written rows sit in the page cache, never in this
    # process's memory, however large the file grows.
    with open(partial, "r+b") as f, _progress_bar(progress, n, done) as bar:
        last_sync = time.monotonic()
        for row, feats in extractor.batches(images, done, workers=workers):
            f.seek(offset + row * row_bytes)
            f.write(np.ascontiguousarray(feats, dtype=dtype))
            done = row + len(feats)
            bar.update(len(feats))
            if time.monotonic() - last_sync >= _PROGRESS_EVERY_S or done == n:
                f.flush()
                os.fsync(f.fileno())  # the rows reach the disk before the record that counts them
                _write_progress(progress_path, fingerprint, done, n)
                last_sync = time.monotonic()

    labels_path = None
    if suffix == ".npy":
        if labels is not None:
            labels_path = out.with_name(out.name[: -len(".npy")] + ".labels.npy")
            _save_npy(labels_path, np.asarray(labels))
        os.replace(partial, out)
        _fsync_dir(out.parent)
    else:
        with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            # the layout np.savez writes; the finished .npy is copied in chunks, not loaded
            with zf.open("features.npy", "w", force_zip64=True) as dst, open(partial, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            if labels is not None:
                with zf.open("labels.npy", "w", force_zip64=True) as dst:
                    np.lib.format.write_array(dst, np.asarray(labels))
        partial.unlink()
    progress_path.unlink(missing_ok=True)
    return ExtractResult(out, labels_path, shape, dtype, resumed_from, extractor.feature_names)


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
    import re

    found: dict[int, dict[int, Path]] = {}
    for p in path.parent.glob(f"{path.stem}.rank*-of-*{path.suffix}"):
        m = re.search(_SHARD_RE, p.name[: -len(path.suffix)] if path.suffix else p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        return []
    if len(found) > 1:
        raise ConfigError(f"{path}: shards of several extractions ({', '.join(f'of-{w}' for w in sorted(found))}); remove the stale ones")
    world, shards = next(iter(found.items()))
    missing = sorted(set(range(world)) - set(shards))
    if missing:
        raise ConfigError(f"{path}: shard(s) {', '.join(map(str, missing))} of {world} are missing; run the extraction again to finish them")
    return [shards[r] for r in range(world)]


def _load_one(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "features" not in z:
                raise ConfigError(f"{path}: no 'features' array; was it written by convae extract?")
            return z["features"], (z["labels"] if "labels" in z else None)
    features = np.load(path, mmap_mode="r", allow_pickle=False)
    labels_path = path.with_name(path.name[: -len(".npy")] + ".labels.npy")
    labels = np.load(labels_path, allow_pickle=False) if labels_path.is_file() else None
    return features, labels


def is_feature_file(spec: str | os.PathLike) -> bool:
    """A finished extraction (a 2-D .npy/.npz, or a complete set of rank shards) at `spec`."""
    path = Path(spec)
    if path.suffix.lower() not in (".npy", ".npz"):
        return False
    if path.is_file():
        try:
            if path.suffix.lower() == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    return "features" in z
            return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 2
        except (OSError, ValueError):
            return False
    return bool(_shards_of(path))


def load_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N, dim) and labels (or None) of `convae extract` output, sharded or not.

    A sharded extraction (``OUT.rank0-of-N.npy`` ...) reads as one result, in image order.
    """
    path = Path(path)
    if path.is_file():
        return _load_one(path)
    shards = _shards_of(path)
    if not shards:
        raise ConfigError(f"{path}: no such features file (nor shards {shard_path(path, 0, 2).name}, ...)")
    parts = [_load_one(p) for p in shards]
    features = np.concatenate([f for f, _ in parts])
    labels = None if any(l is None for _, l in parts) else np.concatenate([l for _, l in parts])
    return features, labels
