"""One memory estimate before allocating: will a model and a training step fit?

:func:`training_memory` sizes a training run from its ModelConfig and TrainConfig alone: the
net is built on the meta device (shapes, no storage), its parameters counted, and one training
step run there with autograd's saved tensors summed (``AutoencoderNet.step_activation_bytes``),
so every net's own objective is measured, no net needs its own formula; a net that samples data
statistics as a stage begins sizes that phase from its shapes (``statistics_bytes``), and the
larger of the two phases counts. :func:`check_training_memory`
compares that with the memory the device has left and refuses, naming the options to lower,
before anything is allocated; :func:`check_inference_memory` does the same for one image of a
loaded run (a config.json whose image size is far beyond what its weights were trained on).

The budget is what the device reports free (``MemAvailable`` and the cgroup's limit on Linux;
``cudaMemGetInfo`` on a GPU), or ``$CONVAE_MEMORY_LIMIT`` (bytes, or e.g. ``8G``) when set: a
user who knows better (swap, a machine shared differently later) raises it there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .._memory import MEMORY_ENV, available_bytes
from ..errors import ConfigError
from .config import ModelConfig
from .registry import net_class

#: Bytes per parameter while training: the weights, their gradients and AdamW's two moments.
_TRAIN_BYTES_PER_PARAM = 16
#: The backward pass holds gradients of activations beside the saved ones: about as many again.
_BACKWARD_FACTOR = 2


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int  # how many
    parameter_bytes: int  # with what training keeps beside them
    activation_bytes: int  # of the largest step (or forward pass)
    statistics_bytes: int = 0  # of the largest data-statistics phase (before a stage trains)

    @property
    def total(self) -> int:
        return self.parameter_bytes + max(self.activation_bytes, self.statistics_bytes)


def _meta_net(config: ModelConfig):
    try:
        with torch.device("meta"):
            return net_class(config.arch)(config)
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise ConfigError(f"the model of these settings cannot be built ({str(e).splitlines()[0][:200]})") from e


def _activations(net, batch: int, training: bool) -> int:
    """The largest stage's saved bytes of a step at `batch`, each from one meta pass at that batch
    (no memory, whatever the batch). Not extrapolated from 1 and 2 images: the hierarchical net's
    upper stages train on a fraction of each batch, rounded up (1 image of 1 and of 2), which the
    line through those two put at 7 MB instead of 50 on CIFAR-10's stage 2 at batch 64."""
    stages = range(net.training_stages()) if training else range(1)
    return max(net.step_activation_bytes(batch, s, training) for s in stages)


def training_memory(model: ModelConfig, batch_size: int) -> MemoryEstimate:
    """What training `model` with batches of `batch_size` needs at its peak."""
    net = _meta_net(model)
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    statistics = max(net.statistics_bytes(s) for s in range(net.training_stages()))
    return MemoryEstimate(
        params,
        params * _TRAIN_BYTES_PER_PARAM + buffers,
        _BACKWARD_FACTOR * _activations(net, batch_size, True),
        statistics,
    )


def inference_memory(model: ModelConfig, batch_size: int = 1) -> MemoryEstimate:
    """What one forward pass of `batch_size` images through `model` needs (weights, activations)."""
    net = _meta_net(model)
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    return MemoryEstimate(params, params * 4 + buffers, _activations(net, batch_size, False))


def available_memory(device: torch.device | str) -> tuple[int | None, str]:
    """(bytes this process may still use on `device`, where that figure comes from); None: unknown."""
    device = torch.device(device)
    if device.type == "cuda" and not os.environ.get(MEMORY_ENV):
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free), f"free on {device}"
        except (RuntimeError, AssertionError):
            return None, ""
    if device.type not in ("cpu", "cuda"):
        return None, ""
    return available_bytes()


def _gib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):,.1f} GiB"
    return f"{n / (1 << 20):,.0f} MiB" if n >= 1 << 20 else f"{n / 1024:,.0f} KiB"


def check_training_memory(model: ModelConfig, batch_size: int, device: torch.device | str) -> MemoryEstimate:
    """ConfigError, naming the options to lower, when training would not fit the device's memory."""
    estimate = training_memory(model, batch_size)
    _check(estimate, model, device, f"training with --batch-size {batch_size}")
    return estimate


def check_inference_memory(model: ModelConfig, device: torch.device | str, where: str) -> MemoryEstimate:
    """ConfigError when even one image of `model` cannot pass through memory: `where` (a
    config.json) asks for an image size far beyond anything its weights were trained on."""
    estimate = inference_memory(model, 1)
    h, w = model.image_size
    fix = f"its image size {h}x{w} is far beyond what the weights were trained on; restore the run's own config.json"
    _check(estimate, model, device, f"{where}: one image", fix)
    return estimate


def _check(estimate: MemoryEstimate, model: ModelConfig, device, what: str, fix: str | None = None) -> None:
    budget, source = available_memory(device)
    if budget is None or estimate.total <= budget:
        return
    net = net_class(model.arch)
    statistics = estimate.statistics_bytes > estimate.activation_bytes
    weights = estimate.parameter_bytes >= max(estimate.activation_bytes, estimate.statistics_bytes)
    options = net.size_options if weights or statistics else net.activation_options
    part = (
        f"{estimate.parameters:,} parameters"
        if weights
        else "the data statistics sampled as a stage begins"
        if statistics
        else "activations"
    )
    fix = fix or f"lower {', '.join(options[:-1])}{' or ' if len(options) > 1 else ''}{options[-1]}"
    raise ConfigError(
        f"{what} needs about {_gib(estimate.total)} (mostly {part}), more than the {_gib(budget)} of "
        f"{source}; {fix} (or set ${MEMORY_ENV} to allow more)"
    )
