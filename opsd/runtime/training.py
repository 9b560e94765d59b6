"""What every training stage (sft, rlvr, distill) calls: the optimizer and its schedule, the guarded
optimizer step, autocast, the policy with optional LoRA, the step's problem order, phase timers.

Small functions, called from each stage's own loop; nothing here owns a loop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from opsd.core.errors import UserError, require
from opsd.core.models import (
    Backbone,
    ModelConfig,
    add_lora,
    empty_model,
    load_model,
    lora_not_linear,
)
from opsd.runtime import distributed


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, ...] = (0.9, 0.999)  # AdamW's (β1, β2)
    warmup_steps: int = 0  # linear warmup from 0 to optim.lr over this many steps
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    max_grad_norm: float = 1.0  # gradient-norm clip
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation inside a step)
    micro_batch_tokens: int = 0  # > 0: micro-batches of at most this many positions (prompts + responses; distill:
    #   with the longest teacher view) instead of micro_batch_size sequences, back to back in one row without
    #   padding, a longer sequence alone. Pays with flash_attention_2 (varlen); sdpa and eager attend densely
    #   over the whole row: keep it near the longest sequence there (benchmarks/micro_batch_tokens.py)
    chunk_size: int = 1024  # positions per chunk of the vocabulary projection (memory: chunk × vocabulary floats)
    gradient_checkpointing: bool = False  # recompute activations in the backward
    bf16: bool = True  # bf16 autocast (GPU only)
    max_skipped_in_a_row: int = 5  # stop the run after this many non-finite steps in a row


def check_optim(optim: OptimConfig) -> None:
    require(
        ("optim.lr", math.isfinite(optim.lr) and optim.lr > 0, "a positive number"),
        ("optim.betas", len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "two numbers in [0, 1)"),
        ("optim.weight_decay", optim.weight_decay >= 0, "non-negative"),
        ("optim.warmup_steps", optim.warmup_steps >= 0, "non-negative"),
        ("optim.max_grad_norm", optim.max_grad_norm > 0, "positive"),
        ("optim.micro_batch_size", optim.micro_batch_size >= 1, "at least 1"),
        ("optim.micro_batch_tokens", optim.micro_batch_tokens >= 0, "non-negative (0: micro_batch_size sequences)"),
        ("optim.chunk_size", optim.chunk_size >= 1, "at least 1"),
        ("optim.max_skipped_in_a_row", optim.max_skipped_in_a_row >= 1, "at least 1"),
    )


def load_policy(config: ModelConfig, optim: OptimConfig, device: torch.device, empty: bool = False) -> nn.Module:
    """The model to train: loaded safely, with activation checkpointing and LoRA when asked. `empty`:
    its architecture on the meta device, no weights (a sharded run's skeleton, filled after sharding)."""
    model = empty_model(config) if empty else load_model(config, device)
    if optim.gradient_checkpointing:
        # transformers 5.24 renamed gradient_checkpointing_enable (the old name warns there)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return add_lora(model, config) if config.lora_rank > 0 else model


def wrap_policy(model: nn.Module, device: torch.device, parallel: distributed.Parallel, fsdp_offload: bool,
                optim: OptimConfig, source: nn.Module | None = None) -> nn.Module:
    """The policy's `Backbone`, wrapped for several processes as run.parallel says (unchanged in one);
    build the optimizer and any snapshot of its weights after this (FSDP replaces the parameters).
    An empty `model` (`load_policy(empty=True)`) receives its shards from `source`, rank 0's whole
    policy in CPU memory (None on the other processes)."""
    if fsdp_offload and device.type != "cuda":
        raise UserError("run.fsdp_offload=true keeps FSDP's shards in CPU memory between GPU steps; on a CPU "
                        "they are there already: set it to false")
    not_linear = lora_not_linear(model) if parallel == "fsdp" and distributed.world_size() > 1 else None
    if not_linear:
        raise UserError(f"run.parallel=fsdp saves LoRA merged from linear layers only, and {not_linear} is not "
                        "one; adapt linear layers only (model.lora_target_modules)")
    return distributed.wrap(Backbone(model), device, parallel, bf16=optim.bf16 and device.type == "cuda",
                            offload=fsdp_offload, source=Backbone(source) if source is not None else None)


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, optim: OptimConfig, step: int, total_steps: int) -> None:
    """Learning rate for 1-based `step`: linear warmup, then constant or cosine to zero."""
    for group in optimizer.param_groups:
        group["lr"] = optim.lr * lr_factor(step - 1, optim, total_steps)


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def guarded_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 has_gradient: bool = True) -> tuple[float, bool]:
    """Clip the gradient norm and step, unless it is not finite: then skip. (grad norm, skipped).

    `has_gradient=False` (nothing was trained on this step) skips silently: AdamW would otherwise
    still apply momentum and weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(distributed.full(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))  # FSDP: a DTensor
    skipped = has_gradient and not math.isfinite(grad_norm)
    if has_gradient and not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def autocast(optim: OptimConfig, device: torch.device):
    """bf16 autocast on GPU, for every forward of a stage alike (fp32 weights stay the master copy)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype(optim, device) is not None)


def compute_dtype(optim: OptimConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where training computes in it (optim.bf16 on GPU), None where it computes in the weights' dtype."""
    return torch.bfloat16 if optim.bf16 and device.type == "cuda" else None


@dataclass(frozen=True)
class Progress:
    """Where a run stands; a checkpoint's training state holds it, so a resumed run continues counting."""

    step: int = 0  # optimizer steps done
    skipped: int = 0  # steps skipped as non-finite, in all
    skipped_in_a_row: int = 0
    empty: int = 0  # steps with nothing to train on, in all
    empty_in_a_row: int = 0
    tokens: int = 0  # response tokens trained on (all processes)

    def after(self, step: int, skipped: bool, tokens: int = 1) -> Progress:
        """Progress after `step`, which was skipped as non-finite or not, and trained on `tokens` (0: empty)."""
        empty = tokens == 0
        return Progress(step, self.skipped + int(skipped), self.skipped_in_a_row + 1 if skipped else 0,
                        self.empty + int(empty), self.empty_in_a_row + 1 if empty else 0, self.tokens + tokens)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """The progress in a training state; counters a checkpoint of an earlier version lacks start from zero."""
        return cls(**{f.name: int(state[f.name]) for f in dataclasses.fields(cls) if f.name in state})

    def state(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def stage_summary(stage: str, progress: Progress) -> str:
    """The line a stage prints when it ends."""
    return (f"opsd {stage}: {progress.step} steps done ({progress.skipped} skipped as non-finite, "
            f"{progress.empty} with nothing to train on), {progress.tokens:,} response tokens trained on")


def step_items(count: int, step: int, per_step: int, shuffle: bool, seed: int) -> list[int]:
    """Indices of the items for `step` (1-based): consecutive slices of per-epoch permutations."""
    picked = []
    for position in range((step - 1) * per_step, step * per_step):
        epoch, k = divmod(position, count)
        picked.append(_epoch_order(count, epoch, shuffle, seed)[k])
    return picked


@functools.lru_cache(maxsize=4)
def _epoch_order(count: int, epoch: int, shuffle: bool, seed: int) -> list[int]:
    return random.Random(seed * 100_003 + epoch).sample(range(count), count) if shuffle else list(range(count))


class Timer:
    """Accumulated wall time per phase; CUDA work is synchronised so each phase is charged its own."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[phase] += time.perf_counter() - start

    def total(self, phase: str) -> float:
        return self.seconds.get(phase, 0.0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
