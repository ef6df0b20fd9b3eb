"""Which module holds each architecture's net: the one list a new net is added to.

Torch-free, so option choices (``convae fit --arch``) and config validation know the
architectures without importing any net; :func:`net_class` imports a net's module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import AutoencoderNet

#: arch name -> "module:class" of its net (each in its own module under convae.models)
ARCHITECTURES: dict[str, str] = {
    "conv": "convae.models.conv:ConvAutoencoderNet",
    "dense": "convae.models.dense:DenseAutoencoderNet",
    "sparse": "convae.models.sparse:SparsePatchAutoencoderNet",
    "hsparse": "convae.models.hsparse:HierarchicalSparseNet",
}


def net_class(arch: str) -> type[AutoencoderNet]:
    """The net class registered for `arch`; an unknown name lists the known ones."""
    try:
        target = ARCHITECTURES[arch]
    except (KeyError, TypeError):
        choices = ", ".join(repr(a) for a in ARCHITECTURES)
        raise ConfigError(f"arch {arch!r} is not one of {choices}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
