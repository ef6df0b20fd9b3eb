"""Training: AdamW with warmup and a cosine or one-cycle schedule, by epochs or wall-clock budget.

    fit.py        fit(): checks the request, opens the run directory, runs the loop
    loop.py       Trainer: fit -> run_epoch -> train_step, and the hooks' named points
    hooks.py      progress bar, checkpoints, the caller's on_epoch, interrupts, the NaN policy
    schedule.py   epochs, learning-rate schedule, train/validation split
    evaluate.py   reconstruction MSE, PSNR and SSIM over images

Faults: a loss that turns NaN or infinite stops, skips the step or halves the learning rate
(`on_nan`); Ctrl-C or SIGTERM stops at a step boundary with a mid-epoch checkpoint (its
position, sums and generator state), from which a resume is exact too.
"""

from __future__ import annotations

from .evaluate import evaluate
from .fit import FitResult, fit
from .hooks import MAX_LR_REDUCTIONS, TrainingError, TrainingInterrupted
from .loop import Trainer, corrupt
from .schedule import AUTO_EPOCH_IMAGES, lr_factor, resolve_epochs, split_train_val

__all__ = [
    "AUTO_EPOCH_IMAGES",
    "MAX_LR_REDUCTIONS",
    "FitResult",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "corrupt",
    "evaluate",
    "fit",
    "lr_factor",
    "resolve_epochs",
    "split_train_val",
]
