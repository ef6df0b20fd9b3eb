"""What happens around the training loop's steps and epochs, each concern one small object.

The loop (:mod:`convae.train.loop`) calls every hook at named points, in order:

    on_train_begin(trainer)               once, before the first epoch
    on_epoch_begin(trainer)               before each attempt at an epoch's first step
    on_loss(trainer, value)               when a step's loss was read and is finite
    on_step_end(trainer)                  after each step (its counters updated)
    on_boundary(trainer)                  then, unless the time budget ran out: where a run may pause
    on_rollback(trainer)                  after reduce-lr went back to the epoch's start
    on_epoch_end(trainer, row)            after an epoch's history row was made
    on_train_end(trainer)                 always, however training ends

Hooks: :class:`ProgressBar`, :class:`Checkpointer` (epoch and mid-epoch checkpoints),
:class:`EpochCallback` (the caller's ``on_epoch``) and :class:`Interrupts` (Ctrl-C and SIGTERM
stop at a step boundary). The NaN policy is not a hook but :class:`NanPolicy`, which the step
and the epoch consult, because it decides what happens next rather than observing it.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConvaeError
from ..progress import make_bar

if TYPE_CHECKING:
    from .loop import Trainer

#: A single-process run also writes a mid-epoch checkpoint after this many seconds without
#: one, so a kill loses at most this much of a long epoch.
CHECKPOINT_INTERVAL_S = 600.0
#: reduce-lr: halvings of the learning rate before the run gives up.
MAX_LR_REDUCTIONS = 10
#: skip: consecutive skipped steps (at most one epoch's worth) before the run gives up.
MAX_SKIPPED_IN_A_ROW = 100


class TrainingError(ConvaeError):
    """Training cannot go on (a loss that is no longer finite)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during fit, raised at a step boundary after the checkpoint its message names.

    `signum` is the signal that asked for it (the CLI exits with 128 + signum).
    """

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


class NonFinite(Exception):
    """A loss (or the weights) stopped being finite at `step`; the NaN policy decides what follows."""

    def __init__(self, value: float, step: int):
        super().__init__(value, step)
        self.value, self.step = value, step


def warn_caller(message: str) -> None:
    """A UserWarning attributed to the first frame outside convae.train (the caller of fit)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


class Hook:
    """A no-op at every point; hooks override the points they care about."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_epoch_begin(self, trainer: Trainer) -> None: ...
    def on_loss(self, trainer: Trainer, value: float) -> None: ...
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_boundary(self, trainer: Trainer) -> None: ...
    def on_rollback(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


class ProgressBar(Hook):
    """A tqdm bar of steps (or of seconds, for a time budget) on the main process."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = make_bar(False)

    def on_train_begin(self, trainer: Trainer) -> None:
        s = trainer.state
        if trainer.total_steps:
            self.bar = make_bar(self.enabled, trainer.total_steps, initial=s.step, unit="step")
        else:
            self.bar = make_bar(self.enabled, round(trainer.config.train.max_time), initial=round(s.elapsed), unit="s")

    def on_loss(self, trainer: Trainer, value: float) -> None:
        ep = trainer.epoch_progress
        rate = ep.seen / max(time.perf_counter() - ep.started, 1e-9)
        self.bar.set_postfix(epoch=trainer.state.epoch + 1, loss=f"{value:.4f}", img_s=f"{rate:.0f}", refresh=False)

    def on_step_end(self, trainer: Trainer) -> None:
        self.bar.update(1 if trainer.total_steps else round(trainer.state.elapsed) - self.bar.n)

    def on_rollback(self, trainer: Trainer) -> None:
        self.bar.n = trainer.state.step
        self.bar.refresh()

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


class Checkpointer(Hook):
    """Weights, history and checkpoint after every epoch (rank 0); mid-epoch checkpoints when a
    single process is interrupted or CHECKPOINT_INTERVAL_S passed without one."""

    def __init__(self, run_dir, interrupts: Interrupts, pausable: bool):
        self.run_dir, self.interrupts, self.pausable = run_dir, interrupts, pausable
        self.last_save = time.perf_counter()

    def on_epoch_begin(self, trainer: Trainer) -> None:
        self.last_save = time.perf_counter()

    def on_boundary(self, trainer: Trainer) -> None:
        due = time.perf_counter() - self.last_save >= CHECKPOINT_INTERVAL_S
        if not (self.pausable and (self.interrupts.requested or due)):
            return
        trainer.save_checkpoint(position=trainer.epoch_progress.position())
        s = trainer.state
        s.saved_at, self.last_save = f"epoch {s.epoch + 1}, step {s.step}", time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if self.run_dir is None or not trainer.dist_info.is_main:
            return
        # Weights and history first, checkpoint last: a resume never skips an epoch's files.
        trainer.save_epoch_files()
        trainer.state.saved_at = f"epoch {trainer.state.epoch}"


class EpochCallback(Hook):
    """The caller's ``on_epoch(row)``, after each epoch's files are written."""

    def __init__(self, callback: Callable[[dict[str, float]], None] | None):
        self.callback = callback

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if self.callback is not None:
            self.callback(row)


class Interrupts(Hook):
    """Defers Ctrl-C (SIGINT) and SIGTERM to the next step boundary, where a checkpoint is consistent.

    Installed only in the main thread and only over Python's default handlers; the first
    signal sets `requested` (to its number) and puts the default handler back, so a second one
    acts at once. It raises :class:`TrainingInterrupted` after the checkpointer has saved.
    """

    _DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, enabled: bool, run_dir, pausable: bool):
        self.enabled, self.run_dir, self.pausable = enabled, run_dir, pausable
        self.requested = 0
        self._installed: list[int] = []

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum, default in self._DEFAULTS.items():
                if signal.getsignal(signum) is default:
                    signal.signal(signum, self._handle)
                    self._installed.append(signum)

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        signal.signal(signum, self._DEFAULTS[signum])

    def on_boundary(self, trainer: Trainer) -> None:
        if not self.requested:
            return
        s = trainer.state
        where = f"epoch {s.epoch + 1}, step {s.step}"
        message = (
            f"saved a checkpoint at {where} in {self.run_dir}; continue with --resume"
            if self.pausable
            else f"stopped at {where}; nothing was saved"
        )
        raise TrainingInterrupted(message, self.requested)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if not self.requested:
            return
        epoch = trainer.state.epoch
        message = (
            f"saved a checkpoint at the end of epoch {epoch} in {self.run_dir}; continue with --resume"
            if self.run_dir is not None
            else f"stopped after epoch {epoch}; nothing was saved"
        )
        raise TrainingInterrupted(message, self.requested)

    def on_train_end(self, trainer: Trainer) -> None:
        for signum in self._installed:
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, self._DEFAULTS[signum])
        self._installed = []


class NanPolicy:
    """What a loss (or, with "skip", a gradient) that is NaN or infinite does: "stop" raises
    TrainingError; "skip" undoes that step; "reduce-lr" goes back to the epoch's start and
    halves the learning rate."""

    def __init__(self, policy: str):
        self.policy = policy
        self.rollback: tuple[dict, dict, int] | None = None

    def check_every(self, device: torch.device, distributed: bool) -> int:
        """Steps between reads of the loss. Free on a CPU; elsewhere a read syncs the host. skip
        reads it every step: it has to decide before the optimizer steps."""
        return 1 if self.policy == "skip" or (device.type == "cpu" and not distributed) else 25

    def on_epoch_begin(self, trainer: Trainer) -> None:
        if self.policy == "reduce-lr":  # the state to go back to: this epoch's start (or resumed position)
            model_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            self.rollback = (model_state, copy.deepcopy(trainer.optimizer.state_dict()), trainer.state.step)

    def too_many_skipped(self, in_a_row: int, steps_per_epoch: int, epoch: int, step: int) -> TrainingError | None:
        if in_a_row < min(MAX_SKIPPED_IN_A_ROW, steps_per_epoch):
            return None
        return TrainingError(
            f"loss or gradients were not finite for {in_a_row} steps in a row "
            f"(epoch {epoch + 1}, up to step {step}); skipping does not help: "
            "check the data or start again with a lower --lr"
        )

    def recover(self, trainer: Trainer, e: NonFinite) -> None:
        """Go back and halve the learning rate (reduce-lr), or raise the TrainingError that ends the run."""
        s = trainer.state
        reductions = round(-math.log2(s.lr_scale))
        kept = f"the last good checkpoint ({s.saved_at}) is kept" if s.saved_at else "nothing was saved"
        where = f"epoch {s.epoch + 1}, step {e.step}"
        if self.policy == "skip":  # the weights broke although every step was checked
            raise TrainingError(f"the weights became non-finite at {where}; {kept}; start again with a lower --lr")
        if self.policy == "stop" or reductions >= MAX_LR_REDUCTIONS:
            also = f" even after halving the learning rate {reductions} times" if reductions else ""
            if reductions:
                fix = "check the data or start again with a much lower --lr"
            elif s.saved_at:
                fix = "resume with --on-nan reduce-lr (or skip), or start again with a lower --lr"
            else:
                fix = "start again with --on-nan reduce-lr (or skip), or with a lower --lr"
            raise TrainingError(f"loss became {e.value} at {where}{also}; training stopped and {kept}; {fix}")
        model_state, optimizer_state, s.step = self.rollback
        trainer.model.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        s.lr_scale = 0.5 ** (reductions + 1)
        trainer.notify("on_rollback")
        warn_caller(
            f"loss became {e.value} at {where}; went back to step {s.step} "
            f"and halved the learning rate (now {s.lr_scale:g} x --lr)"
        )
