"""Which weights the teacher uses: frozen, refreshed every M steps, an EMA, or the live student.

The teacher is always the student's own network (METHODS.md: one model family, one network).
Instead of a second model object, a snapshot of the *trainable* tensors is kept and swapped into
the network (pointer swap, no copy) for the teacher forward. With LoRA and a frozen teacher there is
no snapshot at all: the teacher is the model with its adapters disabled.

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

from opsd.models import Backbone, output_head
from opsd.rollout import Packed, response_hidden

TeacherWeights = Literal["frozen", "refresh", "ema", "live"]


@dataclass(frozen=True)
class TeacherWeightsConfig:
    policy: TeacherWeights = "frozen"  # frozen | refresh | ema | live
    refresh_every: int = 50  # M for policy=refresh (OPSDC's default)
    ema_decay: float = 0.999  # decay for policy=ema


class TeacherWeightsState:
    """The teacher's weights for `model`, updated after each optimizer step."""

    def __init__(self, model: nn.Module, config: TeacherWeightsConfig, uses_lora: bool):
        self.model = model
        self.config = config
        self.adapters_off = uses_lora and config.policy == "frozen"
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
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

    def _swap(self) -> None:
        for param, saved in zip(self.params, self.snapshot):
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
        """The snapshot by parameter name (empty when the teacher needs none)."""
        if self.snapshot is None:
            return {}
        return {name: saved.detach().contiguous() for name, saved in zip(self.names, self.snapshot)}

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
                saved.copy_(param)
            return True
        if self.config.policy == "ema":
            for param, saved in zip(self.params, self.snapshot):
                saved.lerp_(param, 1.0 - self.config.ema_decay)
            return True
        return self.config.policy == "live"


def teacher_hidden(model: nn.Module, packed: Packed, teacher: TeacherWeightsState) -> torch.Tensor:
    """[N × H] teacher hidden states at the response positions, computed without autograd."""
    with teacher.active(), torch.inference_mode():
        hidden_N_H = response_hidden(Backbone(model), packed)
    return hidden_N_H.clone()  # a normal tensor, usable next to autograd outside inference mode


class ExternalTeacher:
    """A different checkpoint as the teacher (e.g. a larger one), frozen, possibly on another device
    or in another dtype. Its hidden states and head come back on the student's device."""

    def __init__(self, model: nn.Module, student_device: torch.device):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.student_device = student_device
        self._head = output_head(model).detach().to(student_device)

    def hidden(self, packed_on_teacher_device: Packed) -> torch.Tensor:
        with torch.inference_mode():
            hidden_N_H = response_hidden(Backbone(self.model), packed_on_teacher_device)
        return hidden_N_H.to(self.student_device).clone()

    def head(self) -> torch.Tensor:
        return self._head
