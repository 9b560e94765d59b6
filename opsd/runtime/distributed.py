"""The few places where many processes differ from one, so the training loop reads the same for both.

With no `WORLD_SIZE` in the environment (or 1) every function here is a no-op. Under
`torchrun`/`accelerate launch` the process group is initialised, each process takes its share of a
step's problems, token counts are summed across processes, and the student backbone is wrapped as
`run.parallel` says:

- `ddp` (the default): DistributedDataParallel. Every process holds the whole model, its gradients
  and the optimizer state (16 bytes per parameter in float32 with AdamW); one all-reduce per step.
- `fsdp`: FSDP2 (`fully_shard`) on every decoder layer and on the backbone as the root. Each process
  holds 1/N of the weights, gradients and optimizer state; a layer's weights are all-gathered for its
  forward and again for its backward, its gradient reduce-scattered. Work without autograd —
  generation and the teacher's or reference's forward — runs inside `gathered`: the whole model is
  all-gathered once, the block runs with no collective in it (so processes may take different
  numbers of decoding steps or micro-batches), and the weights are sharded again after it.

Because FSDP's forward all-gathers are collectives, every process runs the same number of training
forwards and backwards in a step; a process with fewer micro-batches runs `idle_backward` passes.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
import threading
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from opsd.core.errors import UserError
from opsd.core.models import causal_lm, output_head

Parallel = Literal["ddp", "fsdp"]


DEFAULT_TIMEOUT_MIN = 60.0  # run.collective_timeout_min's default
HEARTBEAT_S = float(os.environ.get("OPSD_HEARTBEAT_S", "300"))  # a waiting process says so this often


_target: int | None = None  # `--check --gpus N`: the processes of the GPU machine the checks are for


@contextlib.contextmanager
def checking_for(processes: int):
    """Within the block, check (never run) for a GPU machine of `processes` torchrun processes instead of
    this one: `world_size` says `processes`, `device` resolves auto/cuda to a GPU without looking for one,
    and vLLM's presence is not required (`opsd CMD --check --gpus N` on a login node)."""
    global _target
    _target = processes
    try:
        yield
    finally:
        _target = None


def checking_another_machine() -> bool:
    return _target is not None


def world_size() -> int:
    if _target is not None:
        return _target
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before any process group."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """Launched with several processes and the group is up. (vLLM's engine, in one process, starts a
    process group of one of its own: opsd treats that run as one process and leaves that group alone.)"""
    return world_size() > 1 and dist.is_initialized()


def setup(device: torch.device, cpu_collectives: bool = False, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> int:
    """This process's rank, initialising the process group when launched with several processes.
    `cpu_collectives` (run.fsdp_offload on GPU): gloo next to NCCL, for gradients kept in CPU memory.
    `timeout_min` (run.collective_timeout_min): how long a collective waits for the slowest process."""
    if world_size() == 1:
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "gloo" if device.type != "cuda" else "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    return dist.get_rank()


_kept = False  # inside `one_group`: a stage's teardown leaves the group to the next stage
_waiting = None  # the group `barrier_long` waits in (gloo, 7-day timeout)


def teardown() -> None:
    """Wait for every process, then destroy the group (inside `one_group`, only wait). Callers drop
    their DistributedDataParallel wrapper first: its reducer holds the group, and a group destroyed
    from a reducer's finaliser at function exit was seen to deadlock (gloo's worker thread waiting
    for the GIL the finaliser holds)."""
    global _waiting
    if active():
        dist.barrier()
        if not _kept:
            _waiting = None
            dist.destroy_process_group()


@contextlib.contextmanager
def one_group():
    """One process group for several stages (a pipeline), destroyed at the end. A group destroyed
    and created again reuses the rendezvous keys of the first, so a process that arrives early can
    connect to the old, closed addresses. On an error the group is left as it is, without a barrier
    (the other processes may be inside other collectives): torchrun ends them when this one exits."""
    global _kept
    _kept = True
    try:
        yield
    finally:
        _kept = False
    teardown()


def barrier_long() -> None:
    """Wait for every process, however long one of them works alone first (rank 0 writing a
    checkpoint or evaluating): in a gloo group of its own whose timeout is 7 days, where NCCL's
    default would end the job after 10 minutes. Every process calls it at the same points (the
    first call creates the group). A no-op in one process."""
    if active():
        dist.barrier(group=_long_group())


def gather_long(value) -> list:
    """Every process's `value` (any picklable object), in rank order, on every process, however long
    some of them work first (the gloo group of `barrier_long`); [value] in one process."""
    if not active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_long_group())
    return values


def _long_group():
    """The gloo group whose timeout is 7 days (created by the first call, which every process makes)."""
    global _waiting
    if _waiting is None:
        _waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return _waiting


def device(name: str) -> torch.device:
    """The device named by run.device; `auto` and a bare `cuda` take this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() or _target is not None else "cpu"
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise UserError(f"run.device={name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if chosen.type == "cuda" and _target is not None:
        return torch.device("cuda", chosen.index or 0)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"run.device={name!r} but no CUDA GPU is available")
        if chosen.index is None:
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return chosen


def wrap(backbone: nn.Module, device: torch.device, parallel: Parallel = "ddp", bf16: bool = False,
         offload: bool = False, source: nn.Module | None = None) -> nn.Module:
    """The student's `Backbone` as `run.parallel` says (unchanged in one process). With `fsdp` the
    model's parameters become sharded DTensors: build the optimizer and the teacher's snapshot after.
    `bf16` (GPU): bf16 all-gathers and compute, float32 gradient reduction and master weights.
    `offload` (GPU): the sharded weights, gradients and optimizer state live in CPU memory.
    A backbone on the meta device is sharded empty and then filled from `source` (`fill_from_rank0`)."""
    if not active():
        return backbone
    if parallel == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(backbone, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16: every forward computes with bf16 weights (the root's embeddings and head too, so that
    # masks and hidden states keep one dtype through the model), gradients are reduced in float32
    # into the float32 master weights
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    options = {"mesh": mesh, "mp_policy": precision,
               "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    layers = decoder_layers(backbone)
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(backbone, **options)
    if any(param.is_meta for param in backbone.parameters()):
        fill_from_rank0(backbone, source, torch.device("cpu") if offload else device)
    # Backward prefetch named explicitly: FSDP's default guesses the next layer from the order of
    # the last forwards, which here include `gathered` ones (the teacher's) that only some processes
    # ran, and processes that guess differently all-gather different layers and hang.
    backbone.set_modules_to_backward_prefetch([layers[-1]])
    for previous, layer in zip([backbone, *layers], layers):  # the first layer's "previous" is the
        layer.set_modules_to_backward_prefetch([previous])    # root, whole throughout the backward
    # FSDP takes as its root the first sharded module to run forward: run the backbone once, so that
    # generation (which calls the decoder layers directly) never makes a layer the root
    with torch.no_grad():
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        backbone(ids, torch.ones_like(ids))
    backbone.reshard()
    return backbone


def fill_from_rank0(backbone: nn.Module, source: nn.Module | None, device: torch.device) -> None:
    """Each process's shards of `source` (rank 0's whole model in CPU memory; None on the others) into
    `backbone`, sharded on the meta device: rank 0 broadcasts one tensor at a time and every process
    keeps its slice, so that no process ever holds more than its shards and one whole tensor on its
    device. The buffers too (rotary frequencies: no state dict holds them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    backbone.to_empty(device=device)
    whole = source.state_dict() if source is not None else {}
    set_model_state_dict(backbone, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    theirs = dict(source.named_buffers()) if source is not None else {}
    with torch.no_grad():
        for name, buffer in backbone.named_buffers():
            if source is not None:
                buffer.copy_(theirs[name])
            dist.broadcast(buffer, src=0)


def decoder_layers(backbone: nn.Module) -> list[nn.Module]:
    layers = getattr(causal_lm(backbone.model).get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError("run.parallel=fsdp shards each decoder layer, and this model's decoder has no `layers` list")
    return list(layers)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(backbone: nn.Module):
    """Under FSDP, the whole weights on every process for the block (one all-gather per layer at its
    start, a collective every process enters together), and none of FSDP's collectives inside it:
    the block may run any number of forwards without autograd. Elsewhere a no-op."""
    if not is_sharded(backbone):
        yield
        return
    layers = decoder_layers(backbone)
    for unit in [backbone, *layers]:
        unit.unshard()
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        for unit in [backbone, *layers]:
            unit.reshard()


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def from_rank0(value):
    """Rank 0's `value` (any picklable object) on every process; `value` as it is in one process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(value: int) -> int:
    return _reduce(value, dist.ReduceOp.SUM) if active() else value


def max_over_ranks(value: int) -> int:
    return _reduce(value, dist.ReduceOp.MAX) if active() else value


def sum_floats(values: list[float]) -> list[float]:
    """Each of `values` summed over the processes (float64, one all-reduce); as they are in one process.
    NaN where any process has NaN."""
    return _reduce_floats(values, dist.ReduceOp.SUM) if active() else list(values)


def max_floats(values: list[float]) -> list[float]:
    """Each of `values` maximised over the processes (one all-reduce); as they are in one process. A NaN
    (a process with nothing to measure) counts as absent."""
    if not active():
        return list(values)
    highest = _reduce_floats([-math.inf if math.isnan(v) else v for v in values], dist.ReduceOp.MAX)
    return [math.nan if v == -math.inf else v for v in highest]


def _reduce_floats(values: list[float], op) -> list[float]:
    if not values:
        return []
    on = _collective_device()
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: this process's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_reductions = 0  # the reductions so far: the same sequence on every process


def _reduce(value: int, op) -> int:
    """These small reductions are the collectives processes reach after generating, which takes each
    its own time: a process waiting in one for long says so, and for which processes (`_heartbeat`)."""
    global _reductions
    _reductions += 1
    on = _collective_device()
    tensor = torch.tensor([value], dtype=torch.long, device=on)
    with _heartbeat(_reductions):
        dist.all_reduce(tensor, op=op)
        result = int(tensor.item())
    return result


@contextlib.contextmanager
def _heartbeat(number: int):
    """While this process waits in reduction `number`, a line on stderr every HEARTBEAT_S seconds naming
    the processes that have not reached it (from check-ins in the process group's store)."""
    store, me, world = _store(), dist.get_rank(), dist.get_world_size()
    key = lambda n, r: f"opsd/reached/{n}/{r}"
    if store is not None:
        store.set(key(number, me), "1")
        if number > 2:  # every process has passed reduction number - 1, so number - 2's check-ins are done with
            store.delete_key(key(number - 2, me))
    done = threading.Event()

    def watch() -> None:
        waited = 0.0
        while not done.wait(HEARTBEAT_S):
            waited += HEARTBEAT_S
            missing = [r for r in range(world) if not store.check([key(number, r)])] if store is not None else []
            others = f"process(es) {', '.join(map(str, missing))}" if missing else "the other processes"
            print(f"opsd: process {me} has waited {waited / 60:.1f} min for {others} (still generating? "
                  f"run.collective_timeout_min ends the job past its limit)", file=sys.stderr, flush=True)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _store():
    """The process group's key-value store (torchrun's TCPStore), or None where torch hides it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a private function: absent or changed in another torch
        return None


@contextlib.contextmanager
def no_sync_unless(module: nn.Module, last: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of a step (its whole gradients
    are held anyway). FSDP: reduce-scatter every micro-batch's gradients into the sharded gradient at
    once: skipping it would hold the *unsharded* float32 gradients of the whole model on every process
    until the last micro-batch (4 bytes per parameter whatever the number of processes: ~33 GB at 8B)."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not last:
        with module.no_sync():
            yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(True)
        yield
    else:
        yield


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded DTensor (a view of its storage); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor's whole value (a collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def idle_backward(backbone: nn.Module, model: nn.Module, pad_id: int, device: torch.device) -> None:
    """A zero-valued backward through the backbone and `model`'s head, for a process with no micro-batch left."""
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    hidden = backbone(ids, torch.ones_like(ids))
    ((hidden.sum() + output_head(model).sum()) * 0.0).backward()  # the head read after the forward: whole under FSDP


@contextlib.contextmanager
def unsharded(module: nn.Module):
    """Under FSDP, one sharded module's own weights (a decoder layer's) whole for the block, sharded
    again after it: an all-gather that every process enters together, in the same order. Elsewhere a
    no-op. (`gathered` makes the whole model whole at once.)"""
    if not is_sharded(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
