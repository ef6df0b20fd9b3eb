"""How long training runs and how its learning rate moves."""

from __future__ import annotations

import math

import numpy as np

from ..config import TrainConfig

# Auto epochs aim at about this many image presentations: enough for useful features
# on every built-in dataset while a 2-core CPU finishes in minutes.
AUTO_EPOCH_IMAGES = 150_000


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
    """(train, validation) indices of `n` images: a seeded shuffle, each part sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_val = min(n_val, n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
