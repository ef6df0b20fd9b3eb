"""Scale-out on PyTorch's own engine: torchrun sets the environment, we read it.

`torchrun --nproc_per_node N -m convae fit ...` (or `convae fit --nproc N`, which runs
exactly that) starts N processes; each calls `init()` and trains its shard with
DistributedDataParallel: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConvaeError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """What torchrun (or any launcher using its variables) says about this process."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def _check_gpu_for(device: torch.device, info: DistInfo) -> None:
    if info.enabled and device.type == "cuda" and info.local_rank >= torch.cuda.device_count():
        raise ConvaeError(
            f"--device {device}: {info.local_world_size} processes on this node need a GPU each, "
            f"but it has {torch.cuda.device_count()}; start at most that many (--nproc / --nproc_per_node), "
            "or use --device cpu to train on CPU processes with gloo"
        )


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun prepared, once; a no-op in a single process."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        _check_gpu_for(device, info)
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each process of a multi-GPU run gets its own GPU."""
    _check_gpu_for(device, info)
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device, info: DistInfo) -> bool:
    """True on every rank when it is true on any: keeps ranks stepping in lock-step."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: DDP syncs them before a forward, not after."""
    if info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers by name: of the values, not of their memory layout."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(model: torch.nn.Module, info: DistInfo) -> list[str]:
    """Every rank's :func:`weights_digest`, in rank order, on every rank.

    DDP keeps replicas equal only while every rank computes the same update from the same
    averaged gradients; nodes with other CPUs or library versions can round an optimizer step
    differently and drift apart silently, and rank 0 alone saves its weights.
    """
    digest = weights_digest(model)
    if not info.enabled:
        return [digest]
    gathered: list[str | None] = [None] * info.world_size
    dist.all_gather_object(gathered, digest)
    return [str(d) for d in gathered]


def check_replicas(digests: list[str], when: str) -> None:
    """Raise ConvaeError (the same on every rank) unless every rank's weights are rank 0's."""
    differ = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differ:
        raise ConvaeError(
            f"{when}: the weights of rank(s) {', '.join(map(str, differ))} differ from rank 0's "
            f"({len(digests)} processes); the nodes compute the optimizer's step differently (other CPUs, "
            "torch versions or GPUs?): run every node with the same software, or on one node"
        )


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group and free it now, while the interpreter still runs.

    A DistributedDataParallel wrapper keeps the group alive in reference cycles until the
    garbage collector finds it; collected at interpreter exit instead, gloo's worker threads
    drop their last tensors after Python has stopped, and the process aborts ("terminate
    called without an active exception") after a successful run.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def launch(nproc: int, args: list[str], extra: list[str] | None = None) -> int:
    """Run `torchrun --standalone --nproc_per_node nproc -m convae ARGS`; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += list(extra or []) + ["-m", "convae", *args]
    return subprocess.call(cmd)
