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

from opsd.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> int:
    """This process's rank, initialising the process group when launched with several processes."""
    if world_size() == 1:
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def teardown() -> None:
    """Wait for every process, then destroy the group. Callers drop their DistributedDataParallel
    wrapper first: its reducer holds the group, and a group destroyed from a reducer's finaliser at
    function exit was seen to deadlock (gloo's worker thread waiting for the GIL the finaliser holds)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device(name: str) -> torch.device:
    """The device named by run.device; `auto` and a bare `cuda` take this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise UserError(f"run.device={name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"run.device={name!r} but no CUDA GPU is available")
        if chosen.index is None:
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return chosen


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
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.long, device=on)
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
