"""Devices, and images as tensors: the one place uint8 images become float batches.

Every part of convae that runs a model (training, extraction, probing, views, the estimator)
reads images the same way: uint8 (N, H, W, C) in memory, a memmap or lazily decoded files,
fed batch by batch and scaled to float [0, 1] (N, C, H, W) on the device. This module imports
nothing from convae but its errors, so any layer may use it without an import cycle.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .errors import ConvaeError


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device from "auto", "cpu", "cuda" or "cuda:N"; a clear error when it is not there.

    "auto" is the GPU when this node has one for each of its processes (NCCL cannot share a
    GPU between processes), else the CPU.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if gpu_for_every_process() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConvaeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConvaeError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from e
    if device.type not in ("cpu", "cuda", "mps", "xpu"):  # meta holds no data; others compute nothing of ours
        raise ConvaeError(f"--device {name}: not a device convae computes on (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConvaeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def gpu_for_every_process() -> bool:
    """Whether each of this node's processes (torchrun's LOCAL_WORLD_SIZE) can have a GPU of its own."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return torch.cuda.is_available() and torch.cuda.device_count() >= local_processes


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU from Ampere on (compute capability
    8.0), or a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated and slower than fp32. On a CPU with it, oneDNN's bf16
    convolutions run the default models' training steps about twice as fast as fp32.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


# Whether inference may multiply in bf16 where the device does so natively: a context variable
# (scoped like torch.autocast, per thread and task), set only by `allow_bf16`.
_bf16_allowed = contextvars.ContextVar("convae_bf16_allowed", default=True)


@contextlib.contextmanager
def allow_bf16(allowed: bool) -> Iterator[None]:
    """Within the block, False keeps every no-gradient product of the models in fp32, even where
    :func:`native_bf16` holds (True, the default outside any block, lets them use bf16).

    For features that must be the same on every machine, or compared with an fp32 run: bf16
    products move the hierarchical models' features by about 0.3-0.9% of a standard deviation
    (benchmarks/hsparse_extraction.py), and only on devices with native bf16."""
    token = _bf16_allowed.set(allowed)
    try:
        yield
    finally:
        _bf16_allowed.reset(token)


def bf16_products(device: torch.device) -> bool:
    """Whether a model's no-gradient pass on `device` may multiply in bf16: the device does so
    natively and no ``allow_bf16(False)`` block is in force."""
    return _bf16_allowed.get() and native_bf16(device)


def full_precision(device_type: str):
    """A block computed in fp32 even under autocast. On the meta device (where the memory
    estimate runs a net's training step without allocating) autocast does not exist: no-op."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def weights_key(module: torch.nn.Module) -> tuple | None:
    """What identifies a module's current weights: each tensor, its storage and its version counter,
    which every in-place change bumps (optimizer steps, load_state_dict, copy_); None for inference-mode
    tensors, which keep no version."""
    try:
        return tuple((id(t), t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))
    except RuntimeError:
        return None


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory: a copy from pageable memory
    waits for the GPU's queue to drain, so the host could not queue the next step meanwhile."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_float_nchw(batch, device: str | torch.device = "cpu", *, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, C) images (array or tensor) -> float32 (N, C, H, W) in [0, 1] on `device`.

    With `channels_last` the result keeps the NHWC memory layout the permutation gives (what
    channels-last convolutions want); otherwise it is contiguous NCHW.
    """
    if isinstance(batch, torch.Tensor):
        t = batch
    else:
        arr = np.asarray(batch)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # torch warns on read-only memory
    if t.dtype != torch.uint8:
        raise TypeError(f"to_float_nchw expects uint8 images, got {t.dtype}")
    if t.ndim != 4:
        raise ValueError(f"to_float_nchw expects a (N, H, W, C) batch, got shape {tuple(t.shape)}")
    x = to_device(t, torch.device(device)).permute(0, 3, 1, 2).float().div_(255)
    # permute of an NHWC tensor already has channels_last strides; contiguous() would undo it
    return x if channels_last else x.contiguous()


def evenly_spaced(indices: np.ndarray, count: int) -> np.ndarray:
    """At most `count` of `indices`, evenly spaced and sorted: a class-sorted file still gives every class."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        return indices
    picks = np.unique(np.linspace(0, len(indices) - 1, min(len(indices), count)).astype(np.int64))
    return np.sort(indices[picks])


def iter_uint8_batches(
    images, indices: Sequence[int] | np.ndarray, batch_size: int, workers: int = 0
) -> Iterator[torch.Tensor]:
    """uint8 (B, H, W, C) batches of `images[indices]`, in that order.

    Arrays (and memmaps) are sliced in this process; anything else (LazyImages, views of them)
    is decoded by `workers` DataLoader processes, off the caller's thread.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(images, np.ndarray):
        for start in range(0, len(indices), batch_size):
            yield torch.from_numpy(images[indices[start : start + batch_size]])
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_IndexedImages(images), indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        worker_init_fn=_ignore_sigint if workers else None,
    )
    batches = iter(loader)
    try:
        yield from batches
    except ConvaeError as e:
        # A worker's error comes back wrapped in its traceback; give the user its own one line.
        raise type(e)(_worker_message(e)) from None
    finally:
        # Stop the workers now: an exception's traceback can keep this generator alive until
        # exit, where multiprocessing would wait forever for workers still waiting for work.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def iter_float_batches(
    images, indices: Sequence[int] | np.ndarray, batch_size: int, device: torch.device, *, workers: int = 0
) -> Iterator[torch.Tensor]:
    """float32 (B, C, H, W) batches in [0, 1] of `images[indices]` on `device`, in order."""
    for batch in iter_uint8_batches(images, indices, batch_size, workers):
        yield to_float_nchw(batch, device)


def default_workers(images) -> int:
    """Decoding processes: none for arrays in memory, a few for images decoded from files."""
    return 0 if isinstance(images, np.ndarray) else min(4, os.cpu_count() or 1)


class _IndexedImages(torch.utils.data.Dataset):
    """Lazy images for DataLoader workers: decoding happens in parallel, off the training thread."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[int(i)]))


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops at a step
    boundary (a worker killed mid-step would make the loader fail at an arbitrary point)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_message(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(e).__name__
    last = lines[-1].strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == type(e).__name__ else last
