"""Features of images, batch by batch: one forward pass per batch serves every block, and it
stops after the deepest layer asked for."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .._memory import keep_freed_memory
from ..errors import ConfigError
from ..models.base import SPLIT_SUFFIX
from ..progress import progress_bar
from ..tensors import (
    allow_bf16,
    bf16_products,
    default_workers,
    iter_uint8_batches,
    resolve_device,
    to_float_nchw,
)
from .plan import GRIDS, block_feature_names, check_precision, plan_blocks

# Per batch, the largest encoder map stays under glibc's 32 MiB mmap threshold on CPU, so
# inference reuses freed heap buffers instead of page-faulting fresh ones every batch (see
# _memory.py): the former CIFAR-10 preset's probed layers extracted at 380 images/s in batches
# of 256, 1,080-1,090 at this size (48). Maps of several MB an image get batches below 8: the
# single-layer sparse model (10 MB of sign-split maps an image) extracted at 431 images/s in
# batches of 2 and 155 in batches of 8 (2 threads; benchmarks/extraction_batches.py, RESULTS.md).
_BATCH_MAP_BYTES = 24 << 20
MAX_BATCH = 256


def auto_batch_size(model, device: torch.device, layers: Iterable[str] = ()) -> int:
    """Images per inference batch (extraction, decoding, validation): MAX_BATCH, fewer on CPU for models with large maps.

    Counts the model's layers and, of the sign splits (computed only when asked for), `layers`'.
    """
    if device.type != "cpu":
        return MAX_BATCH
    names = [*model.layer_names, *(n for n in layers if n.endswith(SPLIT_SUFFIX))]
    largest = max(model.inference_map_bytes(name, device) for name in names)
    fits = _BATCH_MAP_BYTES // largest
    return int(min(MAX_BATCH, fits // 8 * 8 if fits >= 8 else max(1, fits)))


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
    g = GRIDS[pool]
    cells = (min(g, x.shape[2]), min(g, x.shape[3]))
    return F.adaptive_avg_pool2d(x, cells).flatten(1)  # (N, C, gh, gw) -> (N, C*gh*gw)


class FeatureExtractor:
    """The pooled outputs of encoder layers, concatenated into one vector per image.

    Puts `model` in eval mode on `device`. ``extractor(x)`` maps a float batch (N, C, H, W) in
    [0, 1] to (N, dim) features; :meth:`transform` and :meth:`batches` take uint8 (N, H, W, C)
    images: an array, a memmap or :class:`convae.data.LazyImages`.

    Parameters
    ----------
    model : AutoencoderNet
        A convae net (e.g. from :func:`convae.load_model`).
    layers : str or list of str
        Layer names (``convae layers RUN_DIR`` lists them), comma-separated or a list, or "all".
    pool : str or list of str
        flatten, avg, max, grid2 or grid4 (several: each layer under each, concatenated).
    device : str or torch.device
        "cpu", "cuda", "auto" ...
    batch_size : int, optional
        Images per forward pass; by default sized to the model's largest map.
    keep_order : bool, default False
        Columns in the order `layers` lists them (a list or "a,b"), each pooling's together,
        instead of network order with each layer's poolings together.
    precision : {"auto", "float32"}, default "auto"
        "auto" lets the hierarchical models multiply in bf16 where the device does so natively
        (about 1.3x faster extraction, features within 1% of a standard deviation of fp32's);
        "float32" keeps every product fp32, the same features on every machine.

    Examples
    --------
    >>> ex = FeatureExtractor(model, "stage2,bottleneck", "grid2")   # doctest: +SKIP
    >>> X = ex.transform(images)          # (N, ex.dim) float32; columns ex.feature_names
    """

    def __init__(
        self,
        model,
        layers: str | Iterable[str] = "bottleneck",
        pool: str | Iterable[str] = "flatten",
        *,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        keep_order: bool = False,
        precision: str = "auto",
    ):
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.precision = check_precision(precision)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.blocks = plan_blocks(model, layers, pool, keep_order)
        self.layers = list(dict.fromkeys(b.layer for b in self.blocks))
        self.pools = list(dict.fromkeys(b.pool for b in self.blocks))
        with allow_bf16(precision == "auto"):
            self.bf16 = bf16_products(self.device)  # whether this extraction's products may run in bf16
            self.batch_size = int(batch_size) if batch_size else auto_batch_size(model, self.device, self.layers)

    @property
    def dim(self) -> int:
        return self.blocks[-1].stop

    @property
    def feature_names(self) -> list[str]:
        return [name for b in self.blocks for name in block_feature_names(b.layer, b.pool, b.shape)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) the model takes."""
        cfg = self.model.config
        return (*cfg.image_size, cfg.in_channels)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with allow_bf16(self.precision == "auto"):
            maps = self.model.forward_intermediates(x, self.layers)
        return torch.cat([pool_features(maps[b.layer], b.pool).float() for b in self.blocks], dim=1)

    def check_images(self, images, what: str = "images") -> None:
        """The images must have the model's (H, W, C)."""
        shape = tuple(int(s) for s in images.shape[1:])
        if shape != self.image_shape:
            raise ConfigError(
                f"{what} are {'x'.join(map(str, shape))} (HxWxC) but the model takes "
                f"{'x'.join(map(str, self.image_shape))}; resize them (--image-size, --channels)"
            )

    def batches(self, images, start: int = 0, *, workers: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 (B, dim) features) for images[start:], batch by batch, in order."""
        self.check_images(images)
        workers = default_workers(images) if workers is None else workers
        keep_freed_memory()
        row = start
        for batch in iter_uint8_batches(images, np.arange(start, len(images)), self.batch_size, workers):
            feats = self(to_float_nchw(batch, self.device)).cpu().numpy()
            yield row, feats
            row += len(feats)

    def transform(self, images, *, dtype=np.float32, progress: bool = False) -> np.ndarray:
        """Features of all images as one (N, dim) array (the only allocation that grows with N)."""
        out = np.empty((len(images), self.dim), dtype=dtype)
        self.fill(out, images, progress=progress)
        return out

    def fill(self, out: np.ndarray, images, *, offset: int = 0, progress: bool = False) -> None:
        """Write the features of `images` into rows offset.. of `out`, batch by batch."""
        with progress_bar(progress, len(images)) as bar:
            for row, feats in self.batches(images):
                _write_rows(out[offset + row : offset + row + len(feats)], feats)
                bar.update(len(feats))


def _write_rows(out: np.ndarray, rows: np.ndarray) -> None:
    """``out[...] = rows`` through torch's vectorized copy where torch can view `out` (numpy's
    float32 -> float16 assignment ran 5-8x slower: 2-4 s of the mnist preset's probe, RESULTS.md)."""
    if out.dtype in (np.float16, np.float32, np.float64) and out.flags.writeable and out.flags.c_contiguous:
        torch.from_numpy(out).copy_(torch.from_numpy(rows))
    else:
        out[...] = rows
