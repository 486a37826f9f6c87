"""Data-parallel training (`torchrun`, `accelerate launch`; gloo on CPU), the same experiment as a single-process run
(which passes through every function unchanged): every process builds the same loader with the same seed and trains
on its slice of every batch (rank r: rows r, r + W, …); DDP averages the gradients, so the effective batch is still
`trainer.batch_size`. Every process evaluates the full splits; only rank 0 writes files and logs to W&B."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Context:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK (torchrun and accelerate launch set them)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Context(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def device_for(ctx: Context, device: torch.device) -> torch.device:
    """Each process of a multi-GPU run takes the GPU of its local rank."""
    import torch

    return torch.device("cuda", ctx.local_rank) if ctx.enabled and device.type == "cuda" else device


def init(ctx: Context, device: torch.device) -> None:
    import torch
    import torch.distributed as dist

    if ctx.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ctx.rank, world_size=ctx.world_size)


def shutdown(ctx: Context) -> None:
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """The module to call for training steps: DDP around `model` when there are several processes."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a multi-task step uses one task's head, the other heads get no gradient
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


def shard(batch: dict, ctx: Context) -> dict:
    """This process's rows of a batch: rank, rank + W, … (all of them if fewer than the processes: no empty step)."""
    rows = batch["input_ids"].shape[0]
    if not ctx.enabled or rows < ctx.world_size:
        return batch
    return {key: value[ctx.rank :: ctx.world_size] for key, value in batch.items()}


def any_process(ctx: Context, flag: bool) -> bool:
    """True on every process when `flag` is true on any (stop together on SIGTERM, never hang)."""
    if not ctx.enabled:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
