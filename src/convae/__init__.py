"""convae: hierarchical image features without labels, from convolutional autoencoders.

The public API (``convae.X``) loads on first use, so ``import convae`` and ``convae --help``
don't pay for torch; ``__all__`` lists it, and the ``TYPE_CHECKING`` imports below tell static
tools where each name lives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import exports
from ._version import __version__

if TYPE_CHECKING:
    from .config import DataConfig, RunConfig, TrainConfig
    from .data import BUILTIN_DATASETS, ImageData, load_dataset
    from .errors import ConfigError, ConvaeError, DataError, RunDirError
    from .estimator import ConvAutoencoder
    from .features import FeatureExtractor, extract_to_file, load_features
    from .models import ModelConfig, build_model, default_model_config
    from .probe import ProbeOptions, run_probe
    from .report import write_report
    from .run import load_config, load_model
    from .views import render_view

__all__ = [
    "BUILTIN_DATASETS",
    "ConfigError",
    "ConvAutoencoder",
    "ConvaeError",
    "DataConfig",
    "DataError",
    "FeatureExtractor",
    "ImageData",
    "ModelConfig",
    "ProbeOptions",
    "RunConfig",
    "RunDirError",
    "TrainConfig",
    "__version__",
    "build_model",
    "default_model_config",
    "extract_to_file",
    "load_config",
    "load_dataset",
    "load_features",
    "load_model",
    "render_view",
    "run_probe",
    "write_report",
]

_EXPORTS = {
    "DataConfig": ".config",
    "RunConfig": ".config",
    "TrainConfig": ".config",
    "BUILTIN_DATASETS": ".data",
    "ImageData": ".data",
    "load_dataset": ".data",
    "ConfigError": ".errors",
    "ConvaeError": ".errors",
    "DataError": ".errors",
    "RunDirError": ".errors",
    "ConvAutoencoder": ".estimator",
    "FeatureExtractor": ".features",
    "extract_to_file": ".features",
    "load_features": ".features",
    "ModelConfig": ".models",
    "build_model": ".models",
    "default_model_config": ".models",
    "ProbeOptions": ".probe",
    "run_probe": ".probe",
    "write_report": ".report",
    "load_config": ".run",
    "load_model": ".run",
    "render_view": ".views",
    # subpackages, for `convae.views.save_figure(...)` without an import of their own
    "data": ".data",
    "distributed": ".distributed",
    "features": ".features",
    "models": ".models",
    "presets": ".presets",
    "probe": ".probe",
    "report": ".report",
    "run": ".run",
    "tensors": ".tensors",
    "train": ".train",
    "views": ".views",
    "analysis": ".analysis",
    "demo": ".demo",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS, globals())
