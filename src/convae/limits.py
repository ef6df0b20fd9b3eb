"""One set of limits for every setting: what ``fit`` accepts is what its config.json loader reads back.

The config dataclasses check these when they are built, and both ways in build them: the
options of ``convae fit`` / ``ConvAutoencoder`` and a config.json being loaded. So a run is
never trained with a value (an infinite ``--noise``, a 999-pixel kernel) that would make its own
config.json unreadable afterwards. Torch-free: the CLI's option types import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

#: Bounds far beyond any real model: past them a config is broken or hostile, and building its
#: model would hang or exhaust memory before any other check could run.
MODEL_LIMITS = {
    "in_channels": 4096,
    "channels": 1 << 16,
    "convs_per_stage": 256,
    "kernel_size": 255,
    "latent_channels": 1 << 16,
    "latent_dim": 1 << 24,
    "hidden": 1 << 20,
    "image_size": 1 << 16,
    # past these a meta-device pass (the memory estimate) would itself allocate per patch
    "patches_per_image": 1 << 20,
    "sparse_k": 1 << 16,
    "upper_kernel": 255,
    "pool_size": 1 << 16,
    "reduce_dim": 1 << 16,
    "groups": 1 << 16,
    "group_size": 1 << 16,
}
MAX_STAGES = 64
#: Training settings past which a machine, not the setting, gives out (a thread each, a process each).
TRAIN_LIMITS = {"threads": 1024, "mask_patch": 1 << 16}
NPROC_MAX = 1024
#: Label subsets a probe averages: each is a full classifier fit.
PROBE_SEEDS_MAX = 1000
#: Items one figure shows (images, channels, patches per channel, interpolation points, neighbours'
#: queries): past this a figure is unreadable and its arrays, not the input, fill memory.
FIGURE_ITEMS_MAX = 1024
#: Gradient steps of activation maximization (a time bound: each is a forward and backward pass).
VIEW_STEPS_MAX = 100_000
#: What JSON round-trips as an integer setting (the loader's range).
INT_RANGE = (-(2**63), 2**63)
#: Seeds that reach numpy's RandomState and scikit-learn's random_state (0 to 2**32 - 1).
SEED_MAX = 2**32 - 1


def _values(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def check_numbers(config: Any) -> None:
    """Every number of the dataclass `config` finite and a 64-bit integer where an integer.

    JSON has no infinity or NaN, and the loader reads integers as 64-bit: a value outside
    either could be trained with but never loaded again.
    """
    for field in dataclasses.fields(config):
        for value in _values(getattr(config, field.name)):
            if isinstance(value, bool):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field.name} must be a finite number, got {value}")
            if isinstance(value, int) and not INT_RANGE[0] <= value < INT_RANGE[1]:
                raise ConfigError(f"{field.name} is out of range (a 64-bit integer)")


def check_model_limits(config: Any, limits: dict[str, int] = MODEL_LIMITS) -> None:
    """The sizes of a ModelConfig within :data:`MODEL_LIMITS` (checked before any net is built),
    or a TrainConfig's within :data:`TRAIN_LIMITS`."""
    for name, limit in limits.items():
        value = getattr(config, name)
        if isinstance(value, tuple) and len(value) > MAX_STAGES:
            what = "stages" if name == "channels" else "entries"  # channels: one width per stage
            raise ConfigError(f"{name}: {len(value)} {what}, implausibly many (at most {MAX_STAGES})")
        for v in _values(value):
            if v > limit:
                shown = v if v < 10**12 else "a huge value"
                raise ConfigError(f"{name} = {shown} is implausibly large (at most {limit})")


def check_seed(value: int, name: str) -> None:
    """A seed numpy and scikit-learn accept (they raise a bare ValueError on others)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{name} must be an integer from 0 to {SEED_MAX}, got {value}")
