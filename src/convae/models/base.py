"""The interface every convae net implements, so no caller needs to know which net it holds.

A net is an ``nn.Module`` built from a :class:`~convae.models.config.ModelConfig` whose encoder
layers have stable names, listed in network order by its :class:`FeatureInfo` (timm's
``feature_info``: channels, stride, receptive field and shape of each). Features, views, the
probe, training and the estimator use only what :class:`AutoencoderNet` declares:

    layer names, ``feature_info`` lookups, layer shapes, receptive boxes
    ``forward_intermediates(x, layers)``  the named layers' outputs; stops after the deepest
    ``encode`` / ``decode`` / ``forward``   code, images from codes, reconstructions
    ``training_loss(x_in, target, step)``  what a training step differentiates
    ``training_stages`` / ``begin_stage``  greedy layer-wise training: stages trained one after the
                                           other, each measuring its data statistics when it begins
    ``calibrate``                          an untrained net's data statistics, without a gradient step
    ``first_layer_filters``                what the filters view draws

Each net lives in its own module under ``convae.models`` and is registered by name in
``convae.models.registry``; a conv block's sign-split maps are offered as the layer
``<block>.split`` by every net that lists the block in ``FeatureInfo.split_of``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..tensors import iter_float_batches

if TYPE_CHECKING:
    from ..config import TrainConfig
    from .config import ModelConfig

SPLIT_SUFFIX = ".split"


@dataclass(frozen=True)
class LayerInfo:
    """One encoder layer, as a timm ``feature_info`` entry (``info["num_chs"]`` works as well).

    `reduction` is the stride in input pixels between neighbouring units (None for vectors),
    `receptive_field` the side of the input square a unit sees, `rf_start` the input
    coordinate of unit 0's centre, `shape` the output (C, H, W) or (D,) of one image.
    """

    module: str
    num_chs: int
    reduction: int | None
    receptive_field: int
    rf_start: float
    shape: tuple[int, ...]
    params: int

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key)
        return list(value) if key == "shape" else value  # the dict form's shape is a list, as in JSON

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 3

    def as_dict(self) -> dict[str, Any]:
        """The timm-style dict: module, num_chs, reduction, receptive_field, rf_start, shape, params."""
        return {k: self[k] for k in self.__dataclass_fields__}


class FeatureInfo(Sequence[LayerInfo]):
    """The encoder's layers in network order, with lookups by name (timm's ``FeatureInfo``).

    `split_of` names the layers (conv blocks) that also offer their sign-split maps as
    ``<name>.split``: twice the channels, the same units and receptive fields.
    """

    def __init__(self, layers: Iterable[LayerInfo], split_of: Iterable[str] = ()):
        self._layers = list(layers)
        self._by_name = {f.module: f for f in self._layers}
        self.split_of = [name for name in self._by_name if name in set(split_of)]

    def __getitem__(self, index):
        return self._layers[index]

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self._layers)

    def names(self) -> list[str]:
        """The layers' names in network order (sign splits not included)."""
        return [f.module for f in self._layers]

    def split_names(self) -> list[str]:
        return [name + SPLIT_SUFFIX for name in self.split_of]

    def feature_names(self) -> list[str]:
        """Every layer name features accept, in network order: a block's split right after it."""
        splits = set(self.split_of)
        out = []
        for name in self.names():
            out.append(name)
            if name in splits:
                out.append(name + SPLIT_SUFFIX)
        return out

    def channels(self) -> list[int]:
        return [f.num_chs for f in self._layers]

    def reduction(self) -> list[int | None]:
        return [f.reduction for f in self._layers]

    def get(self, name: str) -> LayerInfo:
        """The layer called `name` (a split layer: its block's info with the channels doubled)."""
        if name in self._by_name:
            return self._by_name[name]
        base = name.removesuffix(SPLIT_SUFFIX)
        if base != name and base in self.split_of:
            f = self._by_name[base]
            return replace(f, module=name, num_chs=2 * f.num_chs, shape=(2 * f.num_chs, *f.shape[1:]), params=0)
        raise self.unknown([name])

    def unknown(self, names: Iterable[str]) -> ConfigError:
        """The error for layer names this net does not have, listing the ones it does."""
        return ConfigError(
            f"unknown layer(s) {', '.join(sorted(names))}: choose from {', '.join(self.names() + self.split_names())}"
        )


@dataclass
class TrainStep:
    """What a training step's objective may use besides the batch."""

    generator: torch.Generator  # this epoch's random stream (noise, masks, sampled patches)
    loss: str = "mse"  # TrainConfig.loss: "mse" or "bce" of the reconstruction
    stage: int = 0  # which stage trains (greedy layer-wise training; see AutoencoderNet.training_stages)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """`kind` ("mse" or "bce") between the images `logits` decode to and `target`, in fp32."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target)
    return F.mse_loss(torch.sigmoid(logits.float()), target)


class AutoencoderNet(nn.Module):
    """Base class of every convae net: the shared bookkeeping, and what each net must provide.

    Subclasses set :attr:`feature_info` in ``__init__`` and implement ``_intermediates``,
    ``encode``, ``decode``, ``forward`` (the reconstruction in [0, 1]), ``training_loss``,
    ``first_layer_filters`` and the class methods ``check_config`` and ``code_shape``.
    """

    #: What the model card calls it.
    description: ClassVar[str] = "autoencoder"
    #: The ModelConfig fields this net reads (the model card shows these).
    config_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether its layers are maps with receptive fields (False: vectors, as the dense net's).
    spatial: ClassVar[bool] = True
    #: Whether training should feed it channels-last tensors (faster for its convolutions).
    channels_last: ClassVar[bool] = False

    #: The options that make its weights large, then those that make a training step's
    #: activations large: what a memory error tells the user to lower.
    size_options: ClassVar[tuple[str, ...]] = ("--widths",)
    activation_options: ClassVar[tuple[str, ...]] = ("--batch-size", "--image-size")

    config: ModelConfig
    feature_info: FeatureInfo

    # -- configuration ---------------------------------------------------------
    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        """Raise ConfigError for settings this net cannot be built with."""

    @classmethod
    def check_train_config(cls, train: TrainConfig) -> None:
        """Raise ConfigError for training settings its objective does not support."""

    @classmethod
    def default_settings(cls, image_shape: tuple[int, int, int], settings: dict, overrides: dict) -> dict:
        """The default ModelConfig settings for images of `image_shape`, before `overrides` apply."""
        return settings

    @classmethod
    def fields_used(cls, config: ModelConfig) -> tuple[str, ...]:
        """The ModelConfig fields this net reads with `config` (the model card shows these)."""
        return cls.config_fields

    @classmethod
    def code_shape(cls, config: ModelConfig) -> tuple[int, ...]:
        """Shape of one image's bottleneck code, from the config alone."""
        raise NotImplementedError

    # -- layers ----------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return self.feature_info.names()

    @property
    def split_layer_names(self) -> list[str]:
        """``<block>.split`` of each block that offers its sign-split maps."""
        return self.feature_info.split_names()

    def feature_layer_names(self) -> list[str]:
        """Every layer name features accept, in network order (a block's sign split after it)."""
        return self.feature_info.feature_names()

    def layer_info(self, name: str) -> LayerInfo:
        return self.feature_info.get(name)

    def layer_shape(self, name: str) -> list[int]:
        """Output shape of one image at layer `name`: [C, H, W], or [D] for vector layers."""
        return list(self.feature_info.get(name).shape)

    def inference_map_bytes(self, name: str, device: torch.device) -> int:
        """Bytes one image's map at layer `name` takes in inference on `device` (what an
        extraction batch is sized by): float32 unless the net computes that map narrower."""
        return math.prod(self.layer_shape(name)) * 4

    def hierarchy_layers(self) -> list[str]:
        """One layer per depth: every layer that is not a block inside a stage."""
        return [name for name in self.layer_names if "." not in name]

    def receptive_box(self, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
        """Input region (top, left, bottom, right; exclusive, clipped) seen by unit (y, x) of `layer`
        (a split layer's units see what its block's do)."""
        info = self.feature_info.get(layer)
        half = info.receptive_field / 2
        step = info.reduction if info.reduction is not None else 0  # a vector layer: unit (0, 0) only
        cy = info.rf_start + y * step
        cx = info.rf_start + x * step
        h, w = self.config.image_size
        top, left = math.ceil(cy - half + 0.5), math.ceil(cx - half + 0.5)
        bottom, right = top + info.receptive_field, left + info.receptive_field
        return max(top, 0), max(left, 0), min(bottom, h), min(right, w)

    def describe(self) -> list[dict]:
        """One row per encoder layer, then decoder and totals: what `convae info` prints."""
        rows = [
            dict(
                layer=f.module,
                shape="x".join(str(s) for s in f.shape),
                channels=f.num_chs,
                stride=f.reduction if f.reduction is not None else "-",
                receptive_field=f.receptive_field,
                params=f.params,
            )
            for f in self.feature_info
        ]
        encoder = sum(f.params for f in self.feature_info)
        total = sum(p.numel() for p in self.parameters())
        blank = dict(shape="", channels="", stride="", receptive_field="")
        rows.append(dict(layer="decoder", **blank, params=total - encoder))
        rows.append(dict(layer="total", **blank, params=total))
        return rows

    # -- passes ----------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Outputs of the named encoder layers for float images (N, C, H, W) in [0, 1]; stops
        after the deepest one asked for."""
        wanted = set(layers)
        unknown = wanted - set(self.feature_layer_names())
        if unknown:
            raise self.feature_info.unknown(unknown)
        return self._intermediates(x, wanted)

    def _intermediates(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> the bottleneck code."""
        raise NotImplementedError

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Bottleneck codes -> images in [0, 1]."""
        raise NotImplementedError

    def training_loss(self, x_in: torch.Tensor, target: torch.Tensor, step: TrainStep) -> torch.Tensor:
        """The loss a training step minimizes for input `x_in` (perhaps corrupted) and clean `target`."""
        raise NotImplementedError

    # -- stages and data statistics ----------------------------------------------
    def training_stages(self) -> int:
        """How many stages train one after the other (greedy layer-wise): stage k's objective
        trains stage k with the stages before it frozen. One: the whole net at once."""
        return 1

    def begin_stage(self, stage: int, images, indices: np.ndarray, device: torch.device) -> None:
        """Called once as stage `stage` begins training (after the stages before it), with the
        training images: measure what the stage needs from the data (nothing here)."""

    def statistics_bytes(self, stage: int) -> int:
        """Bytes :meth:`begin_stage` holds at its peak beside the weights, from shapes alone (the
        training memory estimate takes the larger of this and a step's): none here."""
        return 0

    @torch.no_grad()
    def calibrate(self, images, indices: np.ndarray, layers: Sequence[str], batch_size: int = 256) -> None:
        """Give an untrained net the data statistics a trained one has, without a gradient step.

        Here: the batch-norm running statistics of the encoder up to `layers`, as a cumulative
        average over `images[indices]` (torch's ``update_bn``); an untrained net's are the
        identity, so its maps would be on whatever scale the random weights give.
        """
        from torch.optim.swa_utils import update_bn

        device = next(self.parameters()).device
        batches = iter_float_batches(images, indices, batch_size, device)
        update_bn(batches, _EncoderUpTo(self, layers))

    # -- memory ----------------------------------------------------------------
    def step_activation_bytes(self, batch: int, stage: int = 0, training: bool = True) -> int:
        """Bytes a step over `batch` images keeps for its backward pass (autograd's saved tensors).

        Measured by running the step on the meta device (call it on a net built there), so
        nothing is allocated and every net's own objective is what is measured; a net whose
        ops the meta device lacks falls back to its layers' shapes (generously). `training`
        False: one forward pass without gradients, sized from the layers' shapes alone (every
        encoder map and as much again for the decoder; no pass run, so loading stays fast).
        """
        h, w = self.config.image_size
        if not training:
            per_image = sum(math.prod(f.shape) for f in self.feature_info) * 4
            return batch * (2 * per_image + self.config.in_channels * h * w * 4)
        x = torch.empty(batch, self.config.in_channels, h, w, device="meta")
        saved = [0]
        seen = {id(t) for t in (*self.parameters(), *self.buffers())}  # saved weights are no new memory
        held = []  # every counted tensor kept alive: a freed one's id, reused, would hide a new tensor

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t if t._base is None else t._base  # a view shares its base's memory: counted once
            if id(base) not in seen:
                seen.add(id(base))
                held.append(base)  # meta tensors: no memory
                saved[0] += base.numel() * base.element_size()
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
                self.training_loss(x, x, TrainStep(torch.Generator(), "mse", stage))
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            per_image = sum(math.prod(f.shape) for f in self.feature_info) * 4
            return 6 * batch * per_image + x.numel() * 4
        return saved[0] + x.numel() * 4

    # -- views -----------------------------------------------------------------
    def first_layer_filters(self) -> tuple[np.ndarray, str]:
        """First-layer weights as images (N, h, w, C_in), in any order, and what they are."""
        raise NotImplementedError


class _EncoderUpTo(nn.Module):
    """A net's forward pass up to `layers` as a module's forward (for torch's update_bn)."""

    def __init__(self, model: AutoencoderNet, layers: Sequence[str]):
        super().__init__()
        self.model, self.layers = model, list(layers)

    def forward(self, x: torch.Tensor):
        return self.model.forward_intermediates(x, self.layers)
