"""The nets: one module per architecture, one interface (:class:`~convae.models.base.AutoencoderNet`).

    config.py     ModelConfig (config.json's "model"), default settings for an image size
    registry.py   arch name -> net class: where a new net is registered
    base.py       the interface every net implements: layers, FeatureInfo, passes, objective
    blocks.py     shared blocks: conv block, sign split, winner-take-all, k-sparse, patch whitening
    conv.py       ConvAutoencoderNet            (arch "conv")
    dense.py      DenseAutoencoderNet           (arch "dense", the fully-connected baseline)
    sparse.py     SparsePatchAutoencoderNet     (arch "sparse", one wide layer of whitened patches)

Importing this package does not import torch; building a net does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ModelConfig, code_size, default_model_config, max_stages, stage_sizes
from .registry import ARCHITECTURES, net_class

if TYPE_CHECKING:
    from .base import AutoencoderNet

__all__ = [
    "ARCHITECTURES",
    "ModelConfig",
    "build_model",
    "code_size",
    "default_model_config",
    "max_stages",
    "net_class",
    "stage_sizes",
]


def build_model(config: ModelConfig) -> AutoencoderNet:
    """The untrained net `config` describes (its arch's class, default initialisation)."""
    return net_class(config.arch)(config)
