"""Training: AdamW with warmup and a cosine or one-cycle schedule, by epochs or wall-clock budget.

Images stay uint8 (in memory, or decoded by DataLoader workers for folders too
large for memory) and are scaled to [0, 1] per batch. Each epoch's shuffling,
noise and masks come from a generator seeded by (seed, epoch), so a run resumed
from its last epoch checkpoint ends with exactly the weights of an uninterrupted one.

Faults: a loss that turns NaN or infinite stops, skips the step or halves the learning
rate (`on_nan`); Ctrl-C or SIGTERM stops at a step boundary with a mid-epoch checkpoint
(its position, sums and generator state), from which a resume is exact too.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from ._memory import keep_freed_memory
from .config import DataConfig, RunConfig, TrainConfig
from .errors import ConvaeError, RunDirError
from .metrics import mse_per_image, psnr_per_image, ssim_per_image
from .model import ModelConfig, build_model

# Auto epochs aim at about this many image presentations: enough for useful features
# on every built-in dataset while a 2-core CPU finishes in minutes.
AUTO_EPOCH_IMAGES = 150_000


class TrainingError(ConvaeError):
    """Training cannot go on (a loss that is no longer finite)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during fit, raised at a step boundary after the checkpoint its message names.

    `signum` is the signal that asked for it (the CLI exits with 128 + signum).
    """

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


#: A single-process run also writes a mid-epoch checkpoint after this many seconds without
#: one, so a kill loses at most this much of a long epoch.
CHECKPOINT_INTERVAL_S = 600.0
#: reduce-lr: halvings of the learning rate before the run gives up.
MAX_LR_REDUCTIONS = 10
#: skip: consecutive skipped steps (at most one epoch's worth) before the run gives up.
MAX_SKIPPED_IN_A_ROW = 100


class _Interrupts:
    """Defers Ctrl-C (SIGINT) and SIGTERM to the next step boundary, where a checkpoint is consistent.

    Installed only in the main thread and only over Python's default handlers; the first
    signal sets `requested` (to its number) and puts the default handler back, so a second one
    acts at once.
    """

    _DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.requested = 0
        self._installed: list[int] = []

    def __enter__(self) -> "_Interrupts":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum, default in self._DEFAULTS.items():
                if signal.getsignal(signum) is default:
                    signal.signal(signum, self._handle)
                    self._installed.append(signum)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        signal.signal(signum, self._DEFAULTS[signum])

    def __exit__(self, *exc) -> None:
        for signum in self._installed:
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, self._DEFAULTS[signum])
        self._installed = []


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    config: RunConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":  # under torchrun: a GPU per process, or every process on CPU
        return torch.device("cuda" if distributed.gpu_for_every_process() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConvaeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConvaeError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from e


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
    capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_epochs(config: TrainConfig, num_train: int) -> int | None:
    """Epochs to run; None means until the time budget runs out."""
    if config.epochs:
        return config.epochs
    if config.max_time:
        return None
    return int(min(60, max(2, round(AUTO_EPOCH_IMAGES / max(num_train, 1)))))


def lr_factor(schedule: str, progress: float, warmup: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1] of the run."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0 if warmup == 0 or progress >= warmup else progress / warmup
    if schedule == "onecycle":
        peak = warmup or 0.3
        if progress < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * progress / peak)) / 2
        rest = (progress - peak) / (1 - peak)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * rest)) / 2
    if warmup and progress < warmup:
        return progress / warmup
    rest = (progress - warmup) / (1 - warmup) if warmup < 1 else 1.0
    return 0.5 * (1 + math.cos(math.pi * rest))


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_val = min(n_val, n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class _IndexedImages(torch.utils.data.Dataset):
    """Lazy images for DataLoader workers: decoding happens in parallel, off the training thread."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[int(i)]))


def iter_uint8_batches(images, indices: np.ndarray, batch_size: int, workers: int = 0) -> Iterator[torch.Tensor]:
    """uint8 (B, H, W, C) batches of `images[indices]`, in that order."""
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


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the training process, which stops at a step
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory: a copy from pageable memory
    waits for the GPU's queue to drain, so the host could not queue the next step meanwhile."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1] on `device`."""
    x = to_device(batch, device).permute(0, 3, 1, 2).float().div_(255)
    # permute of an NHWC tensor already has channels_last strides; contiguous() would undo it
    return x if channels_last else x.contiguous()


def corrupt(x: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Denoising and masking corruptions of the input; the target stays clean."""
    if config.noise > 0:
        noise = to_device(torch.randn(x.shape, generator=generator), x.device)
        x = (x + config.noise * noise).clamp_(0, 1)
    if config.mask_ratio > 0:
        h, w = x.shape[-2:]
        patch = config.mask_patch or max(1, round(min(h, w) / 7))
        gh, gw = math.ceil(h / patch), math.ceil(w / patch)
        keep = to_device(torch.rand((x.shape[0], 1, gh, gw), generator=generator) >= config.mask_ratio, x.device)
        keep = keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :h, :w]
        x = x * keep
    return x


class _Logits(nn.Module):
    """forward() = what a training step differentiates, so DistributedDataParallel wraps that call:
    the model's logits, or, given patch positions, the sparse autoencoder's patch loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, target=None, positions=None):
        if positions is not None:
            return self.model.patch_loss(x, target, positions)
        return self.model.forward_logits(x)


def reconstruction_loss(
    net: nn.Module, x_in: torch.Tensor, target: torch.Tensor, kind: str, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The step's loss: `kind` ("mse", "bce") of the reconstruction of x_in against target; with
    `positions` (arch sparse), the MSE of the whitened patches there."""
    if positions is not None:
        return net(x_in, target, positions)
    logits = net(x_in)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target)
    return F.mse_loss(torch.sigmoid(logits.float()), target)


@torch.inference_mode()
def evaluate(
    model: nn.Module, images, indices: np.ndarray, device: torch.device, batch_size: int | None = None, channels_last=True
) -> dict[str, float]:
    """Mean reconstruction MSE, PSNR (dB) and SSIM over `images[indices]` (batches sized to the model by default)."""
    from .features import auto_batch_size

    if len(indices) == 0:
        return {"mse": float("nan"), "psnr": float("nan"), "ssim": float("nan")}
    batch_size = batch_size or auto_batch_size(model, device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in iter_uint8_batches(images, indices, batch_size):
        x = to_input(batch, device, channels_last)
        recon = model(x).float()
        sums += torch.stack(
            [mse_per_image(recon, x).sum(), psnr_per_image(recon, x).sum(), ssim_per_image(recon, x).sum()]
        ).cpu().double()
    model.train(was_training)
    mse, psnr, ssim = (sums / len(indices)).tolist()
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def fit(
    images,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    data_config: DataConfig | None = None,
    resume: bool = False,
    progress: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_nan: str | None = None,
) -> FitResult:
    """Train a model on uint8 images (N, H, W, C); with `run_dir`, checkpoint every epoch.

    `on_nan` says what a loss (or, with "skip", a gradient) that is NaN or infinite does:
    "stop" (the default) raises TrainingError naming the epoch and step and keeps the last good
    checkpoint; "skip" skips that step (weights, optimizer and BatchNorm statistics stay as they
    were); "reduce-lr" goes back to the start of the epoch and halves the learning rate. None
    takes ``train_config.on_nan`` (on resume, the run's saved policy); a value given here
    replaces it and is recorded in config.json.

    Ctrl-C (SIGINT) or SIGTERM, when fit runs in the main thread of a single process, stops at
    the next step boundary, writes a mid-epoch checkpoint that ``resume=True`` continues
    exactly, and raises :class:`TrainingInterrupted`. A second signal acts at once.

    On Linux with glibc, the first call asks malloc (once per process) to keep freed buffers for
    reuse, so steps don't page-fault their activations back in (``convae._memory``).
    """
    if on_nan is not None:
        train_config = replace(train_config, on_nan=on_nan)  # checked by TrainConfig
    n, h, w, c = images.shape
    if (h, w) != tuple(model_config.image_size) or c != model_config.in_channels:
        raise ConvaeError(
            f"images are {h}x{w}x{c} but the model was configured for "
            f"{model_config.image_size[0]}x{model_config.image_size[1]}x{model_config.in_channels}"
        )
    if n < 2:
        raise ConvaeError(f"need at least 2 images to train, got {n}")
    if model_config.arch == "sparse" and train_config.loss != "mse":
        raise ConvaeError(
            f"loss {train_config.loss}: the sparse autoencoder reconstructs whitened patches, whose values are not "
            "intensities in [0, 1]; use loss mse"
        )
    data_config = data_config or DataConfig(image_size=(h, w), channels=c, num_images=n)
    config = RunConfig(model=model_config, train=train_config, data=data_config)
    device = resolve_device(train_config.device)
    dist_info = distributed.init(device)
    device = distributed.process_device(device, dist_info)
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    keep_freed_memory()

    run_dir = Path(run_dir) if run_dir is not None else None
    lock = checkpoint = None
    try:
        if run_dir is not None:
            config, checkpoint, lock = _start_run(run_dir, config, resume, images.shape, dist_info, on_nan)
        return _train(images, config, checkpoint, device, dist_info, run_dir, progress, on_epoch)
    finally:
        if lock is not None:
            lock.release()


def _start_run(run_dir: Path, config: RunConfig, resume: bool, shape, dist_info, on_nan: str | None = None):
    """Check and lock the run directory; on resume, the run's saved config and its checkpoint.

    A directory whose run never finished an epoch (config.json only: killed early) holds nothing
    to lose: a plain rerun starts it again with the new settings, --resume with the saved ones.
    """
    from . import run as rundir

    ckpt_path = run_dir / rundir.CHECKPOINT_FILE
    if resume and not (run_dir / rundir.CONFIG_FILE).is_file() and not ckpt_path.is_file():
        raise RunDirError(f"{run_dir}: nothing to resume (no {rundir.CHECKPOINT_FILE}); start it without --resume")
    lock = rundir.lock_run(run_dir) if dist_info.is_main else None
    try:
        checkpoint = None
        if resume:
            saved = rundir.load_config(run_dir)
            # The run's own settings win: a resumed run must be the same run. Only the NaN policy,
            # which does not change the weights of steps that go well, may be changed on resume.
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
            if ckpt_path.is_file():
                checkpoint = rundir.load_checkpoint(ckpt_path)
                found = {k: (tuple(v.shape), v.dtype) for k, v in checkpoint["model"].items()}
                rundir.check_state(found, config, ckpt_path)  # before a model of the config is built
            elif dist_info.is_main:
                warnings.warn(
                    f"{run_dir}: no checkpoint yet (the run stopped before its first epoch ended); "
                    "starting it from the beginning with its saved settings",
                    stacklevel=3,
                )
        elif rundir.has_progress(run_dir):
            raise RunDirError(
                f"{run_dir} already holds a run: continue it with --resume, or choose another --out "
                "(convae never overwrites a run)"
            )
        distributed.barrier(dist_info)  # every rank has checked the directory before rank 0 writes
        if dist_info.is_main:
            rundir.clean_run_dir(run_dir)  # temporary files of a killed run
            rundir.save_config(run_dir, config)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return config, checkpoint, lock


def _position(value: Any, steps_per_epoch: int, where: Path) -> dict[str, Any] | None:
    """The mid-epoch position of a checkpoint, checked (it comes from a file)."""
    if value is None:
        return None
    ok = (
        isinstance(value, dict)
        and isinstance(value.get("batches"), int)
        and 0 <= value["batches"] <= steps_per_epoch
        and isinstance(value.get("seen"), int)
        and isinstance(value.get("loss_sum"), float)
        and isinstance(value.get("seconds"), float)
        and isinstance(value.get("generator"), torch.Tensor)
        and value["generator"].dtype == torch.uint8
    )
    if not ok:
        raise RunDirError(f"{where}: its mid-epoch position does not fit this run; cannot resume from it")
    return value


class _NonFinite(Exception):
    def __init__(self, value: float, step: int):
        super().__init__(value, step)
        self.value, self.step = value, step


def _seed64(seed: int) -> int:
    """A seed torch accepts: unchanged where it already did, folded into 64 bits where it did not."""
    return seed if -(2**63) <= seed < 2**64 else seed % 2**64


def _finite_grads(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


# The sparse model's whitening is measured on this many patches of up to this many training
# images (evenly spaced, so a class-sorted file gives every class).
WHITENING_PATCHES = 100_000
WHITENING_IMAGES = 10_000


def _evenly_spaced(indices: np.ndarray, count: int) -> np.ndarray:
    return np.sort(indices[np.unique(np.linspace(0, len(indices) - 1, min(len(indices), count)).astype(np.int64))])


def fit_patch_whitening(model: nn.Module, images, indices: np.ndarray, device, batch_size: int = 256) -> None:
    """Measure a sparse model's patch whitening on up to WHITENING_IMAGES of `images[indices]`."""
    picked = _evenly_spaced(indices, WHITENING_IMAGES)
    batches = (to_input(b, device, False) for b in iter_uint8_batches(images, picked, batch_size))
    model.fit_whitening(batches, patches_per_image=math.ceil(WHITENING_PATCHES / len(picked)))


def _train(images, config: RunConfig, checkpoint, device, dist_info, run_dir, progress, on_epoch):
    from . import run as rundir

    model_config, train_config = config.model, config.train
    on_nan = train_config.on_nan
    n = len(images)
    torch.manual_seed(train_config.seed)
    model = build_model(model_config)
    use_channels_last = train_config.channels_last and model_config.arch == "conv"
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    train_idx, val_idx = split_train_val(n, train_config.val_fraction, train_config.seed)
    sparse = model_config.arch == "sparse"
    if sparse and checkpoint is None:  # a resumed run has them in its checkpoint
        fit_patch_whitening(model, images, train_idx, device)
    net = _Logits(model)
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_config.lr,
        fused=device.type == "cuda",  # one kernel per step instead of a dozen: small models are launch-bound there
    )
    params = decay + no_decay

    # DistributedSampler shards (and pads) each epoch's shuffle so every rank takes the same steps.
    sampler = torch.utils.data.DistributedSampler(
        range(len(train_idx)), num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
        seed=train_config.seed,
    )
    batch_size = min(train_config.batch_size, len(sampler))
    steps_per_epoch = math.ceil(len(sampler) / batch_size)
    epochs = resolve_epochs(train_config, len(train_idx))
    total_steps = epochs * steps_per_epoch if epochs else None
    amp = train_config.amp and native_bf16(device)
    workers = 0 if isinstance(images, np.ndarray) else min(4, os.cpu_count() or 1)

    history: list[dict[str, float]] = []
    start_epoch, step, elapsed = 0, 0, 0.0
    lr_scale = 1.0  # reduce-lr halves it; saved with the checkpoint, so a resume is exact
    position = None  # where in its epoch a mid-epoch checkpoint stopped
    ckpt_path = run_dir / rundir.CHECKPOINT_FILE if run_dir is not None else None
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunDirError(f"{run_dir}: checkpoint does not match config.json ({type(e).__name__})") from e
        start_epoch, step, elapsed = checkpoint["epoch"], checkpoint["step"], float(checkpoint["elapsed"])
        history = list(checkpoint["history"])
        lr_scale = checkpoint.get("lr_scale", 1.0)
        if not isinstance(lr_scale, float) or not 0 < lr_scale <= 1:
            raise RunDirError(f"{ckpt_path}: its learning-rate scale {lr_scale!r} is invalid; cannot resume from it")
        position = _position(checkpoint.get("position"), steps_per_epoch, ckpt_path)
        if position is not None and dist_info.enabled:
            raise RunDirError(f"{ckpt_path} was written mid-epoch by a single process; resume it without --nproc")
    reductions = round(-math.log2(lr_scale))
    saved_at = f"epoch {start_epoch}" if checkpoint is not None else None

    def progress_of(step: int, elapsed: float) -> float:
        parts = []
        if total_steps:
            parts.append(step / total_steps)
        if train_config.max_time:
            parts.append(elapsed / train_config.max_time)
        return max(parts)

    def checkpoint_state(done_epochs: int, pos: dict[str, Any] | None) -> dict[str, Any]:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": done_epochs,
            "step": step,
            "elapsed": elapsed,
            "history": history,
            "lr_scale": lr_scale,
        }
        if pos is not None:
            state["position"] = pos
        return state

    bar = None
    if progress and dist_info.is_main:
        from tqdm.auto import tqdm

        if total_steps:
            bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, leave=True)
        else:
            bar = tqdm(total=round(train_config.max_time), initial=round(elapsed), unit="s", dynamic_ncols=True)

    # The loss is read every step on a CPU (free there), every 25 steps elsewhere (it syncs the
    # host); a device-side record keeps the first bad step exact in between. skip reads it
    # every step: it has to decide before the optimizer steps.
    check_every = 1 if on_nan == "skip" or (device.type == "cpu" and not dist_info.enabled) else 25
    pausable = run_dir is not None and not dist_info.enabled  # mid-epoch checkpoints: single process
    model.train()
    epoch = start_epoch
    out_of_time = train_config.max_time and elapsed >= train_config.max_time
    interrupts = _Interrupts(enabled=not dist_info.enabled)
    try:
        interrupts.__enter__()
        while (epochs is None or epoch < epochs) and not out_of_time:
            sampler.set_epoch(epoch)
            order = train_idx[np.fromiter(iter(sampler), dtype=np.int64)]
            start = position or {"batches": 0, "loss_sum": 0.0, "seen": 0, "generator": None, "seconds": 0.0}
            position = None
            rollback = None
            if on_nan == "reduce-lr":  # the state to go back to: this epoch's start (or resumed position)
                rollback = (
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                    copy.deepcopy(optimizer.state_dict()),
                    step,
                )
            while True:  # one attempt at (the rest of) this epoch; reduce-lr may start it again
                generator = torch.Generator().manual_seed(
                    _seed64((train_config.seed * 1_000_003 + epoch) * 1009 + dist_info.rank)
                )
                if start["generator"] is not None:
                    generator.set_state(start["generator"])
                epoch_start = time.perf_counter() - start["seconds"]
                last_save = time.perf_counter()
                loss_sum = torch.full((), start["loss_sum"], device=device)
                seen, batches, skipped, skipped_in_a_row = start["seen"], start["batches"], 0, 0
                first_bad = torch.full((), -1, dtype=torch.int64, device=device) if check_every > 1 else None
                source = iter_uint8_batches(images, order[batches * batch_size :], batch_size, workers)
                try:
                    for batch in source:
                        t0 = time.perf_counter()
                        factor = lr_factor(train_config.schedule, progress_of(step, elapsed), train_config.warmup)
                        for group in optimizer.param_groups:
                            group["lr"] = train_config.lr * lr_scale * factor
                        x = to_input(batch, device, use_channels_last)
                        x_in = corrupt(x, train_config, generator)
                        buffers = [b.detach().clone() for b in model.buffers()] if on_nan == "skip" else None
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                            positions = model.sample_positions(len(x), generator) if sparse else None
                            loss = reconstruction_loss(net, x_in, x, train_config.loss, positions)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if first_bad is not None:
                            first_bad = torch.where(
                                (first_bad < 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad
                            )
                        bad = False
                        # Reading the loss syncs the host; do it only now and then.
                        if (step + 1) % check_every == 0 or batches + 1 == steps_per_epoch:
                            value = loss.item()
                            bad_step = int(first_bad.item()) if first_bad is not None else -1
                            bad = bad_step >= 0 or not math.isfinite(value)
                            if on_nan == "skip" and not bad:
                                bad = not _finite_grads(params)
                            bad = distributed.any_rank(bad, device, dist_info)
                            if bad and on_nan != "skip":
                                raise _NonFinite(value, bad_step if bad_step >= 0 else step + 1)
                            if bar is not None and not bad:
                                rate = seen / max(time.perf_counter() - epoch_start, 1e-9)
                                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", img_s=f"{rate:.0f}", refresh=False)
                        if bad:  # skip: this step never happened
                            optimizer.zero_grad(set_to_none=True)
                            for b, saved_b in zip(model.buffers(), buffers):
                                b.copy_(saved_b)
                            skipped += 1
                            skipped_in_a_row += 1
                            if skipped_in_a_row >= min(MAX_SKIPPED_IN_A_ROW, steps_per_epoch):
                                raise TrainingError(
                                    f"loss or gradients were not finite for {skipped_in_a_row} steps in a row "
                                    f"(epoch {epoch + 1}, up to step {step + 1}); skipping does not help: "
                                    "check the data or start again with a lower --lr"
                                )
                        else:
                            optimizer.step()
                            loss_sum += loss.detach() * len(batch)
                            seen += len(batch)
                            skipped_in_a_row = 0
                        step += 1
                        batches += 1
                        elapsed += time.perf_counter() - t0
                        if bar is not None:
                            bar.update(1 if total_steps else round(elapsed) - bar.n)
                        if train_config.max_time and distributed.any_rank(
                            elapsed >= train_config.max_time, device, dist_info
                        ):
                            out_of_time = True
                            break
                        if pausable and (
                            interrupts.requested or time.perf_counter() - last_save >= CHECKPOINT_INTERVAL_S
                        ):
                            pos = {
                                "batches": batches,
                                "loss_sum": float(loss_sum.item()),
                                "seen": seen,
                                "generator": generator.get_state(),
                                "seconds": time.perf_counter() - epoch_start,
                            }
                            rundir.save_checkpoint(ckpt_path, checkpoint_state(epoch, pos))
                            saved_at, last_save = f"epoch {epoch + 1}, step {step}", time.perf_counter()
                        if interrupts.requested:
                            raise TrainingInterrupted(
                                f"saved a checkpoint at epoch {epoch + 1}, step {step} in {run_dir}; "
                                "continue with --resume"
                                if pausable
                                else f"stopped at epoch {epoch + 1}, step {step}; nothing was saved",
                                interrupts.requested,
                            )
                    sums = torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)])
                    totals = distributed.all_reduce_sum(sums, dist_info)
                    train_loss = (totals[0] / max(totals[1].item(), 1)).item()
                    # Weights the last step made non-finite never reach a checkpoint.
                    if not math.isfinite(train_loss) or not all(torch.isfinite(p).all() for p in params):
                        raise _NonFinite(train_loss if not math.isfinite(train_loss) else float("nan"), step)
                except _NonFinite as e:
                    kept = f"the last good checkpoint ({saved_at}) is kept" if saved_at else "nothing was saved"
                    if on_nan == "stop" or (on_nan == "reduce-lr" and reductions >= MAX_LR_REDUCTIONS):
                        also = f" even after halving the learning rate {reductions} times" if reductions else ""
                        if reductions:
                            fix = "check the data or start again with a much lower --lr"
                        elif saved_at:
                            fix = "resume with --on-nan reduce-lr (or skip), or start again with a lower --lr"
                        else:
                            fix = "start again with --on-nan reduce-lr (or skip), or with a lower --lr"
                        raise TrainingError(
                            f"loss became {e.value} at epoch {epoch + 1}, step {e.step}{also}; "
                            f"training stopped and {kept}; {fix}"
                        ) from None
                    if on_nan == "skip":  # the weights broke although every step was checked
                        raise TrainingError(
                            f"the weights became non-finite at epoch {epoch + 1}, step {e.step}; {kept}; "
                            "start again with a lower --lr"
                        ) from None
                    model_state, optimizer_state, step = rollback
                    model.load_state_dict(model_state)
                    optimizer.load_state_dict(copy.deepcopy(optimizer_state))
                    reductions += 1
                    lr_scale = 0.5**reductions
                    if bar is not None:
                        bar.n = step
                        bar.refresh()
                    warnings.warn(
                        f"loss became {e.value} at epoch {epoch + 1}, step {e.step}; went back to step {step} "
                        f"and halved the learning rate (now {lr_scale:g} x --lr)",
                        stacklevel=3,
                    )
                    continue
                finally:
                    source.close()  # its DataLoader workers end here, whatever happened
                break
            epoch += 1
            distributed.sync_buffers(model, dist_info)
            if skipped and dist_info.is_main:
                warnings.warn(
                    f"epoch {epoch}: skipped {skipped} step(s) whose loss or gradients were not finite",
                    stacklevel=3,
                )
            seen = int(totals[1].item())
            # Only rank 0 writes; DDP keeps its buffers (BatchNorm statistics) authoritative.
            metrics = (
                evaluate(model, images, val_idx, device, channels_last=use_channels_last)
                if dist_info.is_main
                else {"mse": float("nan"), "psnr": float("nan"), "ssim": float("nan")}
            )
            seconds = time.perf_counter() - epoch_start
            row = {
                "epoch": epoch,
                "step": step,
                "images": seen,
                "train_loss": train_loss,
                "val_mse": metrics["mse"],
                "val_psnr": metrics["psnr"],
                "val_ssim": metrics["ssim"],
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_s": seen / max(seconds, 1e-9),
            }
            history.append(row)
            if run_dir is not None and dist_info.is_main:
                # Weights and history first, checkpoint last: a resume never skips an epoch's files.
                rundir.save_weights(run_dir / rundir.WEIGHTS_FILE, model)
                rundir.write_history(run_dir / rundir.HISTORY_FILE, history)
                rundir.save_checkpoint(ckpt_path, checkpoint_state(epoch, None))
                saved_at = f"epoch {epoch}"
            if on_epoch is not None:
                on_epoch(row)
            if interrupts.requested:
                raise TrainingInterrupted(
                    f"saved a checkpoint at the end of epoch {epoch} in {run_dir}; continue with --resume"
                    if run_dir is not None
                    else f"stopped after epoch {epoch}; nothing was saved",
                    interrupts.requested,
                )
    finally:
        interrupts.__exit__(None, None, None)
        if bar is not None:
            bar.close()

    if run_dir is not None and not history:
        raise TrainingError(f"{run_dir}: the time budget ran out before one epoch finished; raise --max-time")
    model.eval()
    return FitResult(model=model.to(memory_format=torch.contiguous_format), history=history, config=config)


def history_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    if not history:
        return {}
    last = history[-1]
    return {
        "epochs": last["epoch"],
        "val_mse": last["val_mse"],
        "val_psnr": last["val_psnr"],
        "val_ssim": last["val_ssim"],
        "seconds": sum(r["seconds"] for r in history),
    }
