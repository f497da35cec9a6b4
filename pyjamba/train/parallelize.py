"""Data parallelism with FSDP2: the process group, and `fully_shard` applied from outside the model.

Under `torchrun`, each process holds a shard of every parameter, gradient and optimizer state
(FSDP2's `fully_shard`, one unit per decoder layer plus the root for embeddings, final norm and
head); gloo on CPU, NCCL on GPU. Without torchrun nothing here changes the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "init_world", "shard_model"]


@dataclass(frozen=True)
class World:
    """Where this process stands: rank, world size, and its device."""

    rank: int
    size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str = "auto") -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a single process otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(0, 1, torch.device(device if device == "cpu" else "cuda:0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return World(rank, size, torch.device("cuda", local))
    return World(rank, size, torch.device("cpu"))


def shard_model(model: nn.Module, world: World) -> nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head: tied or not)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
