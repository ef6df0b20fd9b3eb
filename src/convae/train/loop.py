"""The training loop: fit -> epoch -> step, with hooks at named points (see :mod:`.hooks`).

Images stay uint8 (in memory, or decoded by DataLoader workers for folders too large for
memory) and are scaled to [0, 1] per batch. Each epoch's shuffling, noise and masks come from a
generator seeded by (seed, epoch, rank), so a run resumed from a checkpoint ends with exactly
the weights of an uninterrupted one; a mid-epoch checkpoint stores the generator's state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from .. import run as rundir
from ..config import RunConfig, TrainConfig
from ..errors import ConfigError, RunDirError
from ..models import build_model
from ..models.base import AutoencoderNet, TrainStep
from ..tensors import default_workers, iter_uint8_batches, native_bf16, to_device, to_float_nchw
from .evaluate import evaluate
from .hooks import Checkpointer, EpochCallback, Hook, Interrupts, NanPolicy, NonFinite, ProgressBar, warn_caller
from .schedule import lr_factor, resolve_epochs, split_train_val


@dataclass
class TrainState:
    """Where a run is: what a checkpoint saves and a resume restores."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps taken, skipped ones included
    elapsed: float = 0.0  # seconds spent in steps (the time budget's clock)
    lr_scale: float = 1.0  # reduce-lr halves it
    history: list[dict[str, float]] = field(default_factory=list)
    position: dict[str, Any] | None = None  # where in its epoch a mid-epoch checkpoint stopped
    saved_at: str | None = None  # the last checkpoint, for messages
    stage: int = 0  # the stage training (greedy layer-wise nets); its data statistics are measured
    replicas: list[str] = field(default_factory=list)  # each rank's weights digest at the last epoch's end


@dataclass
class EpochProgress:
    """One attempt at (the rest of) an epoch."""

    generator: torch.Generator
    started: float  # perf_counter() when the epoch would have started
    loss_sum: torch.Tensor  # on the device: read only at the epoch's end
    seen: int = 0
    batches: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    first_bad: torch.Tensor | None = None  # the first non-finite step between loss reads

    def position(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "loss_sum": float(self.loss_sum.item()),
            "seen": self.seen,
            "generator": self.generator.get_state(),
            "seconds": time.perf_counter() - self.started,
        }


class _Objective(nn.Module):
    """forward() = what a training step differentiates, so DistributedDataParallel wraps that call."""

    def __init__(self, model: AutoencoderNet):
        super().__init__()
        self.model = model

    def forward(self, x_in: torch.Tensor, target: torch.Tensor, step: TrainStep) -> torch.Tensor:
        return self.model.training_loss(x_in, target, step)


def objective_loss(objective: nn.Module, x_in: torch.Tensor, target: torch.Tensor, step: TrainStep) -> torch.Tensor:
    """The step's loss (one seam, so tests can make it non-finite)."""
    return objective(x_in, target, step)


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


def _seed64(seed: int) -> int:
    """A seed torch accepts: unchanged where it already did, folded into 64 bits where it did not."""
    return seed if -(2**63) <= seed < 2**64 else seed % 2**64


def _finite_grads(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


class Trainer:
    """One training run of `config` on uint8 images (N, H, W, C); see :func:`convae.train.fit`."""

    def __init__(
        self,
        images,
        config: RunConfig,
        device,
        dist_info,
        run_dir=None,
        *,
        checkpoint=None,
        progress: bool = False,
        on_epoch=None,
    ):
        self.images, self.config, self.device, self.dist_info, self.run_dir = images, config, device, dist_info, run_dir
        self.train_idx, self.val_idx = split_train_val(len(images), config.train.val_fraction, config.train.seed)
        self._build_model(fit_statistics=checkpoint is None)  # a resumed run has them in its checkpoint
        self._build_optimizer()
        self._plan_epochs()
        self.stages = self.model.training_stages()
        if self.epochs is not None and self.epochs < self.stages:
            raise ConfigError(
                f"arch {config.model.arch} trains {self.stages} stages one after the other, an epoch or more "
                f"each: give at least {self.stages} epochs (got {self.epochs})"
            )
        self.state = TrainState()
        if checkpoint is not None:
            self._restore(checkpoint)
        self.nan = NanPolicy(config.train.on_nan)
        self.check_every = self.nan.check_every(device, dist_info.enabled)
        pausable = run_dir is not None and not dist_info.enabled  # mid-epoch checkpoints: single process
        interrupts = Interrupts(not dist_info.enabled, run_dir, pausable)
        self.hooks: list[Hook] = [
            ProgressBar(progress and dist_info.is_main),
            Checkpointer(run_dir, interrupts, pausable),
            EpochCallback(on_epoch),
            interrupts,  # last: it raises after the others have saved
        ]

    # -- setup -------------------------------------------------------------------
    def _build_model(self, fit_statistics: bool) -> None:
        torch.manual_seed(self.config.train.seed)
        model = build_model(self.config.model)
        self.channels_last = self.config.train.channels_last and model.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        if fit_statistics:
            self.model.begin_stage(0, self.images, self.train_idx, self.device)
        self.objective: nn.Module = _Objective(self.model)
        if self.dist_info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = torch.nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)

    def _build_optimizer(self) -> None:
        train = self.config.train
        decay, no_decay = [], []
        for p in self.model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused on CUDA: one kernel per step instead of a dozen; small models are launch-bound there
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr, fused=self.device.type == "cuda")
        self.params = decay + no_decay

    def _plan_epochs(self) -> None:
        train, info = self.config.train, self.dist_info
        # DistributedSampler shards (and pads) each epoch's shuffle so every rank takes the same steps.
        self.sampler = torch.utils.data.DistributedSampler(
            range(len(self.train_idx)), num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=train.seed
        )
        self.batch_size = min(train.batch_size, len(self.sampler))
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.batch_size)
        self.epochs = resolve_epochs(train, len(self.train_idx))
        self.total_steps = self.epochs * self.steps_per_epoch if self.epochs else None
        self.amp = train.amp and native_bf16(self.device)
        self.workers = default_workers(self.images)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunDirError(f"{self.run_dir}: checkpoint does not match config.json ({type(e).__name__})") from e
        s = self.state
        s.epoch, s.step, s.elapsed = checkpoint["epoch"], checkpoint["step"], float(checkpoint["elapsed"])
        s.history = list(checkpoint["history"])
        where = self.run_dir / rundir.CHECKPOINT_FILE
        s.lr_scale = checkpoint.get("lr_scale", 1.0)
        if not isinstance(s.lr_scale, float) or not 0 < s.lr_scale <= 1:
            raise RunDirError(f"{where}: its learning-rate scale {s.lr_scale!r} is invalid; cannot resume from it")
        s.position = _position(checkpoint.get("position"), self.steps_per_epoch, where)
        if s.position is not None and self.dist_info.enabled:
            raise RunDirError(f"{where} was written mid-epoch by a single process; resume it without --nproc")
        s.saved_at = f"epoch {s.epoch}"
        s.stage = checkpoint.get("stage", 0)  # written before stages existed: single-stage nets
        if not isinstance(s.stage, int) or isinstance(s.stage, bool) or not 0 <= s.stage < self.stages:
            raise RunDirError(f"{where}: its stage {s.stage!r} does not fit this run; cannot resume from it")

    # -- the loop ----------------------------------------------------------------
    def notify(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def fit(self) -> list[dict[str, float]]:
        """Train until the epochs or the time budget run out; the history rows."""
        s, budget = self.state, self.config.train.max_time
        self.model.train()
        self.out_of_time = bool(budget and s.elapsed >= budget)
        try:
            self.notify("on_train_begin")
            while (self.epochs is None or s.epoch < self.epochs) and not self.out_of_time:
                self.run_epoch()
        finally:
            self.notify("on_train_end")
        self.model.eval()
        return s.history

    def run_epoch(self) -> None:
        """One epoch (the rest of it, after a mid-epoch checkpoint), then its history row."""
        s = self.state
        self.sampler.set_epoch(s.epoch)
        order = self.train_idx[np.fromiter(iter(self.sampler), dtype=np.int64)]
        start, s.position = s.position, None
        stage = self._stage_of_epoch()
        if stage > s.stage:  # the stages before it are trained: it measures its data, then trains
            self.model.begin_stage(stage, self.images, self.train_idx, self.device)
            s.stage = stage
        self.nan.on_epoch_begin(self)
        while True:  # one attempt at (the rest of) this epoch; reduce-lr may start it again
            self.notify("on_epoch_begin")
            try:
                train_loss, seen = self._attempt_epoch(order, start)
                break
            except NonFinite as e:
                self.nan.recover(self, e)
        s.epoch += 1
        distributed.sync_buffers(self.model, self.dist_info)
        if self.dist_info.enabled:  # recorded in the checkpoint: each rank's weights, as rank 0 saves them
            s.replicas = distributed.replica_digests(self.model, self.dist_info)
            distributed.check_replicas(s.replicas, f"epoch {s.epoch}")
        if self.epoch_progress.skipped and self.dist_info.is_main:
            warn_caller(
                f"epoch {s.epoch}: skipped {self.epoch_progress.skipped} step(s) whose loss or gradients were not finite"
            )
        row = self._history_row(train_loss, seen)
        s.history.append(row)
        self.notify("on_epoch_end", row)

    def _start_epoch(self, start: dict[str, Any] | None) -> EpochProgress:
        s, info = self.state, self.dist_info
        start = start or {"batches": 0, "loss_sum": 0.0, "seen": 0, "generator": None, "seconds": 0.0}
        generator = torch.Generator().manual_seed(
            _seed64((self.config.train.seed * 1_000_003 + s.epoch) * 1009 + info.rank)
        )
        if start["generator"] is not None:
            generator.set_state(start["generator"])
        return EpochProgress(
            generator=generator,
            started=time.perf_counter() - start["seconds"],
            loss_sum=torch.full((), start["loss_sum"], device=self.device),
            seen=start["seen"],
            batches=start["batches"],
            first_bad=torch.full((), -1, dtype=torch.int64, device=self.device) if self.check_every > 1 else None,
        )

    def _attempt_epoch(self, order: np.ndarray, start: dict[str, Any] | None) -> tuple[float, int]:
        """Steps over the epoch's batches from where `start` says; (mean train loss, images) over all ranks."""
        ep = self.epoch_progress = self._start_epoch(start)
        budget = self.config.train.max_time
        source = iter_uint8_batches(self.images, order[ep.batches * self.batch_size :], self.batch_size, self.workers)
        try:
            for batch in source:
                self.train_step(batch)
                self.notify("on_step_end")
                if budget and distributed.any_rank(self.state.elapsed >= budget, self.device, self.dist_info):
                    self.out_of_time = True
                    break
                self.notify("on_boundary")
            sums = torch.stack([ep.loss_sum.float(), torch.tensor(float(ep.seen), device=self.device)])
            totals = distributed.all_reduce_sum(sums, self.dist_info)
            train_loss = (totals[0] / max(totals[1].item(), 1)).item()
            # Weights the last step made non-finite never reach a checkpoint.
            if not math.isfinite(train_loss) or not all(torch.isfinite(p).all() for p in self.params):
                raise NonFinite(train_loss if not math.isfinite(train_loss) else float("nan"), self.state.step)
            return train_loss, int(totals[1].item())
        finally:
            source.close()  # its DataLoader workers end here, whatever happened

    def train_step(self, batch: torch.Tensor) -> None:
        """One optimizer step on a uint8 batch, or none where the NaN policy skips it."""
        s, ep, train = self.state, self.epoch_progress, self.config.train
        t0 = time.perf_counter()
        factor = lr_factor(train.schedule, self._progress(), train.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = train.lr * s.lr_scale * factor
        x = to_float_nchw(batch, self.device, channels_last=self.channels_last)
        x_in = corrupt(x, train, ep.generator)
        buffers = [b.detach().clone() for b in self.model.buffers()] if self.nan.policy == "skip" else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = objective_loss(self.objective, x_in, x, TrainStep(ep.generator, train.loss, s.stage))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ep.first_bad is not None:
            ep.first_bad = torch.where((ep.first_bad < 0) & ~torch.isfinite(loss.detach()), s.step + 1, ep.first_bad)
        if self._bad_step(loss):  # skip: this step never happened
            self.optimizer.zero_grad(set_to_none=True)
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
            ep.skipped += 1
            ep.skipped_in_a_row += 1
            error = self.nan.too_many_skipped(ep.skipped_in_a_row, self.steps_per_epoch, s.epoch, s.step + 1)
            if error is not None:
                raise error
        else:
            self.optimizer.step()
            ep.loss_sum += loss.detach() * len(batch)
            ep.seen += len(batch)
            ep.skipped_in_a_row = 0
        s.step += 1
        ep.batches += 1
        s.elapsed += time.perf_counter() - t0

    def _bad_step(self, loss: torch.Tensor) -> bool:
        """Whether this step must be skipped; NonFinite where the policy does not skip.

        The loss is read only every `check_every` steps (and at the epoch's end): a read syncs
        the host with the device. `first_bad` keeps the first bad step exact in between."""
        s, ep = self.state, self.epoch_progress
        if (s.step + 1) % self.check_every and ep.batches + 1 != self.steps_per_epoch:
            return False
        value = loss.item()
        bad_step = int(ep.first_bad.item()) if ep.first_bad is not None else -1
        bad = bad_step >= 0 or not math.isfinite(value)
        if self.nan.policy == "skip" and not bad:
            bad = not _finite_grads(self.params)
        bad = distributed.any_rank(bad, self.device, self.dist_info)
        if bad and self.nan.policy != "skip":
            raise NonFinite(value, bad_step if bad_step >= 0 else s.step + 1)
        if not bad:
            self.notify("on_loss", value)
        return bad

    def _stage_of_epoch(self) -> int:
        """The stage that trains in the epoch starting now: the run split evenly between stages,
        by epochs, or by the time budget's seconds."""
        s, budget = self.state, self.config.train.max_time
        if self.epochs is not None:
            return min(self.stages - 1, s.epoch * self.stages // self.epochs)
        return min(self.stages - 1, int(s.elapsed * self.stages / budget))

    def _first_epoch(self, stage: int) -> int:
        return -(-stage * self.epochs // self.stages)  # ceil: the inverse of _stage_of_epoch

    def _progress(self) -> float:
        """How far through its stage (the whole run, for one stage) this step is, by steps or by the
        time budget (the further one): the learning-rate schedule restarts with each stage."""
        s, budget, k, n = self.state, self.config.train.max_time, self.state.stage, self.stages
        parts = []
        if self.total_steps:
            start, stop = (self._first_epoch(i) * self.steps_per_epoch for i in (k, k + 1))
            parts.append((s.step - start) / max(stop - start, 1))
        if budget:
            parts.append((s.elapsed - k * budget / n) * n / budget)
        return max(parts)

    def _history_row(self, train_loss: float, seen: int) -> dict[str, float]:
        s = self.state
        # Only rank 0 writes; DDP keeps its buffers (BatchNorm statistics) authoritative.
        if self.dist_info.is_main:
            metrics = evaluate(self.model, self.images, self.val_idx, self.device, channels_last=self.channels_last)
        else:
            metrics = {"mse": float("nan"), "psnr": float("nan"), "ssim": float("nan")}
        seconds = time.perf_counter() - self.epoch_progress.started
        return {
            "epoch": s.epoch,
            "step": s.step,
            "images": seen,
            "train_loss": train_loss,
            "val_mse": metrics["mse"],
            "val_psnr": metrics["psnr"],
            "val_ssim": metrics["ssim"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9),
        }

    # -- files -------------------------------------------------------------------
    def save_checkpoint(self, position: dict[str, Any] | None = None) -> None:
        s = self.state
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": s.epoch,
            "step": s.step,
            "elapsed": s.elapsed,
            "history": s.history,
            "lr_scale": s.lr_scale,
            "stage": s.stage,
        }
        if s.replicas:
            state["replicas"] = s.replicas
        if position is not None:
            state["position"] = position
        rundir.save_checkpoint(self.run_dir / rundir.CHECKPOINT_FILE, state)

    def save_epoch_files(self) -> None:
        rundir.save_weights(self.run_dir / rundir.WEIGHTS_FILE, self.model)
        rundir.write_history(self.run_dir / rundir.HISTORY_FILE, self.state.history)
        self.save_checkpoint()


def _position(value: Any, steps_per_epoch: int, where) -> dict[str, Any] | None:
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
