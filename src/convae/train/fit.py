"""`fit`: check the request, open the run directory, hand the loop a model to train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from .. import run as rundir
from .._memory import keep_freed_memory
from ..config import DataConfig, RunConfig, TrainConfig
from ..errors import ConvaeError
from ..models import ModelConfig, net_class
from ..models.memory import check_training_memory
from ..tensors import resolve_device
from .hooks import TrainingError
from .loop import Trainer


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    config: RunConfig


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
    force: bool = False,
) -> FitResult:
    """Train a model on uint8 images (N, H, W, C); with `run_dir`, checkpoint every epoch.

    `on_nan` says what a loss (or, with "skip", a gradient) that is NaN or infinite does:
    "stop" (the default) raises TrainingError naming the epoch and step and keeps the last good
    checkpoint; "skip" skips that step (weights, optimizer and BatchNorm statistics stay as they
    were); "reduce-lr" goes back to the start of the epoch and halves the learning rate. None
    takes ``train_config.on_nan`` (on resume, the run's saved policy); a value given here
    replaces it and is recorded in config.json.

    An existing `run_dir` that holds other files but no run is refused unless `force`; then the
    run's files go beside the user's, which are never replaced or removed.

    Ctrl-C (SIGINT) or SIGTERM, when fit runs in the main thread of a single process, stops at
    the next step boundary, writes a mid-epoch checkpoint that ``resume=True`` continues
    exactly, and raises :class:`TrainingInterrupted`. A second signal acts at once.

    On Linux with glibc, the first call asks malloc (once per process) to keep freed buffers for
    reuse, so steps don't page-fault their activations back in (``convae._memory``).

    Returns
    -------
    FitResult
        The trained model (eval mode, on the training device), one history row per epoch,
        and the RunConfig (on resume, the run's own).

    Examples
    --------
    >>> from convae.data import load_dataset
    >>> from convae.models import default_model_config
    >>> images = load_dataset("digits", "train").images
    >>> result = fit(images, default_model_config(images.shape[1:]), TrainConfig(epochs=1))
    >>> result.history[-1]["val_psnr"] > 0
    True
    """
    if on_nan is not None:
        train_config = replace(train_config, on_nan=on_nan)  # checked by TrainConfig
    _check_request(images, model_config, train_config)
    n, h, w, c = images.shape
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
    if not resume:  # before the run directory is made: a run that cannot fit leaves nothing behind
        check_training_memory(config.model, min(config.train.batch_size, n), device)
    try:
        if run_dir is not None:
            config, checkpoint, lock = rundir.start_run(
                run_dir, config, resume, images.shape, dist_info, on_nan, force=force
            )
        if resume:  # the run's saved settings
            check_training_memory(config.model, min(config.train.batch_size, n), device)
        trainer = Trainer(
            images, config, device, dist_info, run_dir, checkpoint=checkpoint, progress=progress, on_epoch=on_epoch
        )
        history = trainer.fit()
    finally:
        if lock is not None:
            lock.release()
    if run_dir is not None and not history:
        raise TrainingError(f"{run_dir}: the time budget ran out before one epoch finished; raise --max-time")
    return FitResult(model=trainer.model.to(memory_format=torch.contiguous_format), history=history, config=config)


def _check_request(images, model_config: ModelConfig, train_config: TrainConfig) -> None:
    n, h, w, c = images.shape
    if (h, w) != tuple(model_config.image_size) or c != model_config.in_channels:
        raise ConvaeError(
            f"images are {h}x{w}x{c} but the model was configured for "
            f"{model_config.image_size[0]}x{model_config.image_size[1]}x{model_config.in_channels}"
        )
    if n < 2:
        raise ConvaeError(f"need at least 2 images to train, got {n}")
    net_class(model_config.arch).check_train_config(train_config)
