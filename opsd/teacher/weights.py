"""The teacher's weights, kept beside the student's in the same network: frozen, refreshed every M
steps, an EMA, or the live student (METHODS.md: one model family, one network). Also the KL
reference of `opsd rlvr`, which is a frozen set of the same kind.

Instead of a second model object, a snapshot of the *trainable* tensors is kept and swapped into
the network (pointer swap, no copy) for the teacher forward. With LoRA and a frozen teacher there is
no snapshot at all: the teacher is the model with its adapters disabled. Under FSDP
(`run.parallel=fsdp`) the snapshot is sharded like the parameters it shadows (each process holds 1/N
of it) and swapped by value into the shards, which FSDP's all-gather reads, before the weights are
gathered for the teacher's forward.

| policy  | snapshot                          | memory                         |
| frozen  | initial trainable tensors         | one copy (none with LoRA)      |
| refresh | hard copy of the student every M  | one copy (adapters with LoRA)  |
| ema     | decay·ema + (1−decay)·student     | one copy (adapters with LoRA)  |
| live    | none: the current student         | none                           |
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from opsd.core.models import output_head
from opsd.runtime.distributed import local

TeacherWeights = Literal["frozen", "refresh", "ema", "live"]


@dataclass(frozen=True)
class TeacherWeightsConfig:
    policy: TeacherWeights = "frozen"  # frozen | refresh | ema | live
    refresh_every: int = 50  # M for policy=refresh (OPSDC's default)
    ema_decay: float = 0.999  # decay for policy=ema


class TeacherWeightsState:
    """The teacher's weights for `model`, updated after each optimizer step. Built from the start
    model, before any step or restore: a frozen snapshot is the start model's weights."""

    def __init__(self, model: nn.Module, config: TeacherWeightsConfig, uses_lora: bool):
        self.model = model
        self.config = config
        self.adapters_off = uses_lora and config.policy == "frozen"
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.sharded = any(isinstance(p, DTensor) for p in self.params)  # FSDP's parameters (built after wrapping)
        keeps_copy = config.policy in ("frozen", "refresh", "ema") and not self.adapters_off
        self.snapshot = [p.detach().clone() for p in self.params] if keeps_copy else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within this block the network computes with the teacher's weights."""
        if self.adapters_off:
            with self.model.disable_adapter():
                yield
            return
        if self.snapshot is None:
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for param, saved in zip(self.params, self.snapshot):
            if self.sharded:  # by value: FSDP all-gathers from the shard's own storage
                mine, theirs = local(param), local(saved)
                kept = mine.clone()
                mine.copy_(theirs)
                theirs.copy_(kept)
            else:
                param.data, saved.data = saved.data, param.data

    def head(self) -> torch.Tensor:
        """The teacher's unembedding matrix (the snapshot's when the head is trained)."""
        head = output_head(self.model)
        if self.snapshot is not None:
            for param, saved in zip(self.params, self.snapshot):
                if param is head:
                    return saved
        return head

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot by parameter name (empty when the teacher needs none); under FSDP, this
        process's shards as DTensors (for torch.distributed.checkpoint, which loads them in place)."""
        if self.snapshot is None:
            return {}
        if self.sharded:
            return dict(zip(self.names, self.snapshot))
        return {name: saved.detach().contiguous() for name, saved in zip(self.names, self.snapshot)}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves of the teacher (teacher.safetensors): a refresh or EMA snapshot,
        which no file on disk holds; nothing for frozen (the start model) or live."""
        return {} if self.config.policy == "frozen" else self.state_dict()

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back a snapshot saved by `state_dict` (resuming a run)."""
        if self.snapshot is None:
            return
        for name, saved in zip(self.names, self.snapshot):
            saved.copy_(tensors[name])

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """Update after optimizer step `step` (1-based); True when the teacher changed."""
        if self.config.policy == "refresh" and step % self.config.refresh_every == 0:
            for param, saved in zip(self.params, self.snapshot):
                local(saved).copy_(local(param))
            return True
        if self.config.policy == "ema":
            for param, saved in zip(self.params, self.snapshot):
                local(saved).lerp_(local(param), 1.0 - self.config.ema_decay)
            return True
        return self.config.policy == "live"


def start_snapshot(model: nn.Module, config: TeacherWeightsConfig, uses_lora: bool) -> dict[str, torch.Tensor]:
    """What a frozen teacher's snapshot will be, read from the start model before any wrapping: its
    trainable tensors (none with LoRA, whose frozen teacher is the base). Checkpoints record its
    fingerprint instead of a copy, and a resumed run rebuilds it from the start model."""
    if config.policy != "frozen" or uses_lora:
        return {}
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
