"""The few places where many processes differ from one, so the training loop reads the same for both.

With no `WORLD_SIZE` in the environment (or 1) every function here is a no-op. Under
`torchrun`/`accelerate launch` the process group is initialised, the student backbone is wrapped in
DistributedDataParallel, each process takes its share of a step's problems, and token counts are
summed across processes.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def setup() -> tuple[int, int]:
    """(rank, world size), initialising the process group when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_initialized():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def sum_over_ranks(value: int) -> int:
    return _reduce(value, dist.ReduceOp.SUM) if dist.is_initialized() else value


def max_over_ranks(value: int) -> int:
    return _reduce(value, dist.ReduceOp.MAX) if dist.is_initialized() else value


def _reduce(value: int, op) -> int:
    tensor = torch.tensor([value], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def no_sync_unless(module: nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not last:
        return module.no_sync()
    return contextlib.nullcontext()


def idle_backward(backbone: nn.Module, head: torch.Tensor, pad_id: int, device: torch.device) -> None:
    """A zero-valued backward through the backbone and head, for a process with no micro-batch left."""
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    ((backbone(ids, torch.ones_like(ids)).sum() + head.sum()) * 0.0).backward()
