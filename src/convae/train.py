"""Training: AdamW with warmup and a cosine or one-cycle schedule, by epochs or wall-clock budget.

Images stay uint8 (in memory, or decoded by DataLoader workers for folders too
large for memory) and are scaled to [0, 1] per batch. Each epoch's shuffling,
noise and masks come from a generator seeded by (seed, epoch), so a run resumed
from its last epoch checkpoint ends with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import DataConfig, RunConfig, TrainConfig
from .errors import ConvaeError, RunDirError
from .metrics import mse_per_image, psnr_per_image, ssim_per_image
from .model import ModelConfig, build_model

# Auto epochs aim at about this many image presentations: enough for useful features
# on every built-in dataset while a 2-core CPU finishes in minutes.
AUTO_EPOCH_IMAGES = 150_000


class TrainingError(ConvaeError):
    """Training cannot go on (a loss that is no longer finite)."""


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    config: RunConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConvaeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConvaeError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from e


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
    )
    yield from loader


def to_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1] on `device`."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    # permute of an NHWC tensor already has channels_last strides; contiguous() would undo it
    return x if channels_last else x.contiguous()


def corrupt(x: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Denoising and masking corruptions of the input; the target stays clean."""
    if config.noise > 0:
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = (x + config.noise * noise).clamp_(0, 1)
    if config.mask_ratio > 0:
        h, w = x.shape[-2:]
        patch = config.mask_patch or max(1, round(min(h, w) / 7))
        gh, gw = math.ceil(h / patch), math.ceil(w / patch)
        keep = (torch.rand((x.shape[0], 1, gh, gw), generator=generator) >= config.mask_ratio).to(x.device)
        keep = keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :h, :w]
        x = x * keep
    return x


class _Logits(nn.Module):
    """forward() = the model's logits, so DistributedDataParallel wraps the call that training makes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_logits(x)


def reconstruction_loss(net: nn.Module, x_in: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    logits = net(x_in)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target)
    return F.mse_loss(torch.sigmoid(logits.float()), target)


@torch.inference_mode()
def evaluate(
    model: nn.Module, images, indices: np.ndarray, device: torch.device, batch_size: int = 256, channels_last=True
) -> dict[str, float]:
    """Mean reconstruction MSE, PSNR (dB) and SSIM over `images[indices]`."""
    if len(indices) == 0:
        return {"mse": float("nan"), "psnr": float("nan"), "ssim": float("nan")}
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
) -> FitResult:
    """Train a model on uint8 images (N, H, W, C); with `run_dir`, checkpoint every epoch."""
    from . import run as rundir  # run.py builds models; imported here to keep module load light

    n, h, w, c = images.shape
    if (h, w) != tuple(model_config.image_size) or c != model_config.in_channels:
        raise ConvaeError(
            f"images are {h}x{w}x{c} but the model was configured for "
            f"{model_config.image_size[0]}x{model_config.image_size[1]}x{model_config.in_channels}"
        )
    if n < 2:
        raise ConvaeError(f"need at least 2 images to train, got {n}")
    data_config = data_config or DataConfig(image_size=(h, w), channels=c, num_images=n)
    config = RunConfig(model=model_config, train=train_config, data=data_config)
    device = resolve_device(train_config.device)
    dist_info = distributed.init(device)
    device = distributed.process_device(device, dist_info)
    if train_config.threads:
        torch.set_num_threads(train_config.threads)

    run_dir = Path(run_dir) if run_dir is not None else None
    checkpoint = None
    if run_dir is not None:
        ckpt_path = run_dir / rundir.CHECKPOINT_FILE
        if resume:
            if not ckpt_path.is_file():
                raise RunDirError(f"{run_dir}: nothing to resume (no {rundir.CHECKPOINT_FILE}); start it without --resume")
            saved = rundir.load_config(run_dir)
            # The run's own settings win: a resumed run must be the same run.
            config = replace(saved, data=replace(saved.data, spec=data_config.spec or saved.data.spec))
            model_config, train_config = config.model, config.train
            checkpoint = rundir.load_checkpoint(ckpt_path)
        elif (run_dir / rundir.CONFIG_FILE).exists():
            raise RunDirError(
                f"{run_dir} already holds a run: continue it with --resume, or choose another --out "
                "(convae never overwrites a run)"
            )
        distributed.barrier(dist_info)  # every rank has checked the directory before rank 0 writes
        if dist_info.is_main:
            rundir.save_config(run_dir, config)

    torch.manual_seed(train_config.seed)
    model = build_model(model_config)
    use_channels_last = train_config.channels_last and model_config.arch == "conv"
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
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
    )

    train_idx, val_idx = split_train_val(n, train_config.val_fraction, train_config.seed)
    # DistributedSampler shards (and pads) each epoch's shuffle so every rank takes the same steps.
    sampler = torch.utils.data.DistributedSampler(
        range(len(train_idx)), num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
        seed=train_config.seed,
    )
    batch_size = min(train_config.batch_size, len(sampler))
    steps_per_epoch = math.ceil(len(sampler) / batch_size)
    epochs = resolve_epochs(train_config, len(train_idx))
    total_steps = epochs * steps_per_epoch if epochs else None
    amp = device.type == "cuda" and train_config.amp
    workers = 0 if isinstance(images, np.ndarray) else min(4, os.cpu_count() or 1)

    history: list[dict[str, float]] = []
    start_epoch, step, elapsed = 0, 0, 0.0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise RunDirError(f"{run_dir}: checkpoint does not match config.json ({type(e).__name__})") from e
        start_epoch, step, elapsed = checkpoint["epoch"], checkpoint["step"], checkpoint["elapsed"]
        history = list(checkpoint["history"])

    def progress_of(step: int, elapsed: float) -> float:
        parts = []
        if total_steps:
            parts.append(step / total_steps)
        if train_config.max_time:
            parts.append(elapsed / train_config.max_time)
        return max(parts)

    bar = None
    if progress and dist_info.is_main:
        from tqdm.auto import tqdm

        if total_steps:
            bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, leave=True)
        else:
            bar = tqdm(total=round(train_config.max_time), initial=round(elapsed), unit="s", dynamic_ncols=True)

    model.train()
    epoch = start_epoch
    out_of_time = train_config.max_time and elapsed >= train_config.max_time
    try:
        while (epochs is None or epoch < epochs) and not out_of_time:
            sampler.set_epoch(epoch)
            order = train_idx[np.fromiter(iter(sampler), dtype=np.int64)]
            generator = torch.Generator().manual_seed(
                (train_config.seed * 1_000_003 + epoch) * 1009 + dist_info.rank
            )
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            seen = 0
            for batch in iter_uint8_batches(images, order, batch_size, workers):
                t0 = time.perf_counter()
                factor = lr_factor(train_config.schedule, progress_of(step, elapsed), train_config.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = train_config.lr * factor
                x = to_input(batch, device, use_channels_last)
                x_in = corrupt(x, train_config, generator)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = reconstruction_loss(net, x_in, x, train_config.loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(batch)
                seen += len(batch)
                step += 1
                elapsed += time.perf_counter() - t0
                # Reading the loss syncs the host; do it only now and then.
                if step % 25 == 0 or seen == len(order):
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"loss became {value} at epoch {epoch + 1}, step {step}; "
                            "the last good checkpoint is kept; try a lower --lr"
                        )
                    if bar is not None:
                        rate = seen / max(time.perf_counter() - epoch_start, 1e-9)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", img_s=f"{rate:.0f}", refresh=False)
                if bar is not None:
                    bar.update(1 if total_steps else round(elapsed) - bar.n)
                if train_config.max_time and distributed.any_rank(
                    elapsed >= train_config.max_time, device, dist_info
                ):
                    out_of_time = True
                    break
            epoch += 1
            distributed.sync_buffers(model, dist_info)
            totals = distributed.all_reduce_sum(
                torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)]), dist_info
            )
            seen = int(totals[1].item())
            train_loss = (totals[0] / max(seen, 1)).item()
            if not math.isfinite(train_loss):
                raise TrainingError(f"loss became {train_loss} in epoch {epoch}; try a lower --lr")
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
                rundir.save_checkpoint(
                    run_dir / rundir.CHECKPOINT_FILE,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "elapsed": elapsed,
                        "history": history,
                    },
                )
            if on_epoch is not None:
                on_epoch(row)
    finally:
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
