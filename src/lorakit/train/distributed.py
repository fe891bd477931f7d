"""Data parallelism through torch.distributed: process group from the `torchrun` environment, DDP, reductions.

Outside `torchrun` (no WORLD_SIZE > 1 in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's rank among world_size, and whether `setup` created the process group."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0


def setup(device: torch.device) -> Processes:
    """Join (or create, gloo on CPU / nccl on CUDA) the process group described by torchrun's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return Processes()
    if dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), owns_group=False)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), owns_group=True)


def teardown(procs: Processes) -> None:
    """Destroy the process group if `setup` created it."""
    if procs.owns_group:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, procs: Processes) -> torch.nn.Module:
    """DistributedDataParallel over several processes (it all-reduces only parameters that need grad)."""
    if procs.world_size == 1:
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean(value: float, procs: Processes) -> float:
    """The mean of `value` over all processes."""
    if procs.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / procs.world_size


def gather(obj, procs: Processes) -> list:
    """`obj` from every process, in rank order."""
    if procs.world_size == 1:
        return [obj]
    out = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out
