"""Features of images, batch by batch: one forward pass per batch serves every block, and it
stops after the deepest layer asked for."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator

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
    weights_key,
)
from .codes import FeatureCodes
from .plan import GRIDS, block_feature_names, check_compile, check_precision, plan_blocks

# Per batch, the largest encoder map stays under glibc's 32 MiB mmap threshold on CPU, so
# inference reuses freed heap buffers instead of page-faulting fresh ones every batch (see
# _memory.py): the former CIFAR-10 preset's probed layers extracted at 380 images/s in batches
# of 256, 1,080-1,090 at this size (48). Maps of several MB an image get batches below 8: the
# single-layer sparse model (10 MB of sign-split maps an image) extracted at 431 images/s in
# batches of 2 and 155 in batches of 8 (2 threads; benchmarks/extraction_batches.py, RESULTS.md).
_BATCH_MAP_BYTES = 24 << 20
MAX_BATCH = 256
# compile="auto" compiles the forward pass of an extraction of at least this many images.
# Compiling took 18 s with inductor's on-disk cache cold and 5 s warm (2 cores); it saved 1.3 ms
# an image on the cifar10 preset's model and 0.6 ms on mnist's (RESULTS.md): a gain from about
# 10,000 images, and in the presets' probes (70,000-110,000 images) about 1.5-2 minutes
AUTO_COMPILE_IMAGES = 10_000
_RECOMPILE_LIMIT = 64


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
    compile : {"auto", "always", "never"}, default "auto"
        Run the forward pass through ``torch.compile``, which fuses the elementwise work
        between the products (the contrast normalization, the sign split and the pooling): the
        presets' models extract 1.0-2.0x as fast on 2 cores (the hierarchical ones 1.3-2.0x),
        after 1-20 s of compiling. "auto" compiles for an extraction (:meth:`transform`,
        :meth:`fill`, :meth:`batches`) of at least AUTO_COMPILE_IMAGES images. The weights are
        compiled in as constants, and compiled again if they change. Features match the
        uncompiled pass's up to float rounding. Where compiling fails (no C++ compiler, say),
        the extractor warns once and runs uncompiled.

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
        compile: str = "auto",
    ):
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.precision = check_precision(precision)
        self.compile = check_compile(compile)
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None  # once an extraction asks for it
        self._compile_failed = False
        self._compiled_weights: tuple | None = None
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) features of a float (B, C, H, W) batch."""
        if self.compile == "always" or self._compiled is not None:
            self._start_compiling()  # (again, if the weights changed)
        return self._features(x)

    @torch.inference_mode()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        # the weights checked by the caller: once a call, or once an extraction (batches)
        with allow_bf16(self.precision == "auto"):
            compiled = self._compiled
            return self._forward(x) if compiled is None else self._compiled_forward(compiled, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model.forward_intermediates(x, self.layers)
        return torch.cat([pool_features(maps[b.layer], b.pool).float() for b in self.blocks], dim=1)

    def _plan_compile(self, n_images: int) -> None:
        auto = self.compile == "auto" and n_images >= AUTO_COMPILE_IMAGES
        if self.compile == "always" or self._compiled is not None or auto:
            self._start_compiling()

    def _start_compiling(self) -> None:
        if self._compiled is not None and weights_key(self.model) != self._compiled_weights:
            self._compiled = None  # the weights changed since: they are constants in the compiled code
        if self._compiled is None and not self._compile_failed:
            # compiled on its first call. Freezing folds the weights in as constants, so the
            # ConvAE's convolutions are prepacked once: the mnist-convae preset's model extracted
            # at 0.76x its uncompiled speed without it, 1.7x with it (RESULTS.md)
            self._compiled = torch.compile(self._forward, dynamic=False, options={"freezing": True})
            self._compiled_weights = weights_key(self.model)

    def _compiled_forward(self, compiled: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # The compiled code is specialized to its input's shape and strides: every batch is copied
        # into one layout (an image's stride differs with its channels), a short last batch padded.
        n = len(x)
        full = x.new_zeros((max(n, self.batch_size), *x.shape[1:]))
        full[:n] = x
        try:
            # dynamo compiles each function once per model it meets (it guards on the module), at
            # most recompile_limit (8) times, then runs it uncompiled with no error: a probe with
            # its random baseline, or the roofline's ten models, passed it
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return compiled(full)[:n]
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the batch's, not the compiler's: uncompiled it would need as much
        except Exception as error:  # inductor needs a C++ compiler on a CPU, triton on a GPU
            self._compiled, self._compile_failed = None, True
            warnings.warn(
                f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); extracting without it",
                RuntimeWarning,
                stacklevel=3,
            )
            return self._forward(x)

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
        self._plan_compile(len(images) - start)
        keep_freed_memory()
        row = start
        for batch in iter_uint8_batches(images, np.arange(start, len(images)), self.batch_size, workers):
            feats = self._features(to_float_nchw(batch, self.device)).cpu().numpy()
            yield row, feats
            row += len(feats)

    def transform(self, images, *, dtype=np.float32, progress: bool = False) -> np.ndarray:
        """Features of all images as one (N, dim) array (the only allocation that grows with N)."""
        out = np.empty((len(images), self.dim), dtype=dtype)
        self.fill(out, images, progress=progress)
        return out

    def fill(
        self, out: np.ndarray, images, *, offset: int = 0, progress: bool = False, codes: FeatureCodes | None = None
    ) -> None:
        """Write the features of `images` into rows offset.. of `out`, batch by batch (with
        `codes`, their 8-bit codes: `out` uint8)."""
        with progress_bar(progress, len(images)) as bar:
            for row, feats in self.batches(images):
                target = out[offset + row : offset + row + len(feats)]
                if codes is None:
                    _write_rows(target, feats)
                else:
                    codes.encode(feats, target)
                bar.update(len(feats))


def _write_rows(out: np.ndarray, rows: np.ndarray) -> None:
    """``out[...] = rows`` through torch's vectorized copy where torch can view `out` (numpy's
    float32 -> float16 assignment ran 5-8x slower: 2-4 s of the mnist preset's probe, RESULTS.md)."""
    if out.dtype in (np.float16, np.float32, np.float64) and out.flags.writeable and out.flags.c_contiguous:
        torch.from_numpy(out).copy_(torch.from_numpy(rows))
    else:
        out[...] = rows
