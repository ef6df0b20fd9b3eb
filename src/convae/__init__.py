"""convae: hierarchical image features without labels, from convolutional autoencoders."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# Everything loads on first use, so `import convae` (and `convae --help`) doesn't pay for torch.
_LAZY = {
    "DataConfig": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "ConfigError": "errors",
    "ConvaeError": "errors",
    "DataError": "errors",
    "RunDirError": "errors",
    "ModelConfig": "model",
    "build_model": "model",
    "default_model_config": "model",
    "ConvAutoencoder": "estimator",
    "load_dataset": "data",
    "ImageData": "data",
    "BUILTIN_DATASETS": "data",
    "load_model": "run",
    "load_config": "run",
    "load_features": "features",
}

if TYPE_CHECKING:
    from .config import DataConfig, RunConfig, TrainConfig
    from .data import BUILTIN_DATASETS, ImageData, load_dataset
    from .errors import ConfigError, ConvaeError, DataError, RunDirError
    from .estimator import ConvAutoencoder
    from .features import load_features
    from .model import ModelConfig, build_model, default_model_config
    from .run import load_config, load_model


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'convae' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", *sorted(_LAZY)]
