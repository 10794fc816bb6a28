"""torch.distributed glue for the CLI: ranks from ``torchrun``'s environment, image shards, gathers.

Nothing home-made: launch and rendezvous are ``torchrun``'s, the process group is PyTorch's
(NCCL on GPUs, gloo on CPUs). Rank r of W samples ``shard_sizes(n, W)[r]`` images with seed
``seed + r``, so a W-rank run gives exactly the union of W single-process runs with those seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "shard_sizes", "rank_seed", "gather", "teardown"]


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Context:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device.startswith("cuda") if device is not None else torch.cuda.is_available()
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    if want_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if world > 1 else torch.device(
            device or "cuda")
        if dev.index is None:  # set_device refuses a bare "cuda" (torch 2.11 on the H100, 2026-11-28)
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device or "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Context(rank, dist.get_world_size() if dist.is_initialized() else 1, dev)


def shard_sizes(n: int, world_size: int) -> list:
    """n items over world_size ranks, the remainder to the first ranks: shard_sizes(5, 2) == [3, 2]."""
    return [n // world_size + (r < n % world_size) for r in range(world_size)]


def rank_seed(seed: int, rank: int) -> int:
    return seed + rank


def gather(ctx: Context, x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's x (CPU copies, in rank order) on rank 0; None elsewhere."""
    x = x.detach().cpu()
    if ctx.world_size == 1:
        return x
    parts = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(x, parts, dst=0)
    return torch.cat(parts) if ctx.is_main else None


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
