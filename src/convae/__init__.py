"""convae: hierarchical image features without labels, from convolutional autoencoders."""
from ._version import __version__
from .config import DataConfig, RunConfig, TrainConfig
from .errors import ConfigError, ConvaeError, DataError, RunDirError
from .model import ModelConfig, build_model, default_model_config


def __getattr__(name):
    # Heavier pieces load on first use, so `import convae` stays quick.
    if name == "ConvAutoencoder":
        from .estimator import ConvAutoencoder

        return ConvAutoencoder
    if name in ("load_dataset", "ImageData", "BUILTIN_DATASETS"):
        from . import data

        return getattr(data, name)
    if name in ("load_model", "load_config"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'convae' has no attribute {name!r}")


__all__ = [
    "__version__",
    "BUILTIN_DATASETS",
    "ConfigError",
    "ConvAutoencoder",
    "ConvaeError",
    "DataConfig",
    "DataError",
    "ImageData",
    "ModelConfig",
    "RunConfig",
    "RunDirError",
    "TrainConfig",
    "build_model",
    "default_model_config",
    "load_config",
    "load_dataset",
    "load_model",
]
