"""The teacher of `opsd distill`: its context (what it is shown), its weights, and its target.

Contexts (METHODS.md §1–§4) are described in one place, `CONTEXTS`: what each needs from a problem
row and whether it writes a memo or uses Purified OPSD's three views. The teacher's prompt of each
kept rollout (`rollout_teacher_prompts`) and its target logits for a micro-batch (`teacher_target`)
are built here from that description.

Weights: frozen, refreshed every M steps, an EMA, or the live student. The self-teacher is the
student's own network (METHODS.md: one model family, one network); an external teacher is another
checkpoint with the same tokenizer (`ExternalTeacher`).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from opsd.core.data import Problem
from opsd.runtime.distributed import local
from opsd.core.errors import UserError
from opsd.teacher.memo import memo_teacher_message, write_memos
from opsd.core.models import Backbone, load_model, load_tokenizer, output_head
from opsd.core.packing import Packed, pack, response_hidden
from opsd.core.prompts import reference_only_message, render_prompt, teacher_user_message
from opsd.objectives.purified import PurifiedTarget

TeacherWeights = Literal["frozen", "refresh", "ema", "live"]


@dataclass(frozen=True)
class ContextSpec:
    """What a teacher context needs and does."""

    needs_answer: bool  # the gold answer goes into the teacher's prompt or the memo's feedback
    writes_memo: bool  # a memo per kept rollout is written and put into that rollout's teacher prompt
    purified: bool  # three frozen views combined into Purified OPSD's target


CONTEXTS = {
    "reference": ContextSpec(needs_answer=False, writes_memo=False, purified=False),
    "answer": ContextSpec(needs_answer=True, writes_memo=False, purified=False),
    "concise": ContextSpec(needs_answer=False, writes_memo=False, purified=False),
    "template": ContextSpec(needs_answer=False, writes_memo=False, purified=False),
    "memo": ContextSpec(needs_answer=True, writes_memo=True, purified=False),
    "purified": ContextSpec(needs_answer=False, writes_memo=False, purified=True),
}


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


@dataclass(frozen=True)
class TeacherPrompts:
    """Token ids of the prompts of every problem: the student's, the teacher's and (purified) πR's."""

    student: list[list[int]]
    teacher: list[list[int]]  # context=memo: the problem alone, replaced per rollout once its memo is written
    reference_only: list[list[int]] | None  # Purified OPSD's πR view

    def select(self, indices: list[int]) -> TeacherPrompts:
        pick = lambda rows: None if rows is None else [rows[i] for i in indices]  # noqa: E731
        return TeacherPrompts(pick(self.student), pick(self.teacher), pick(self.reference_only))


def render_teacher_prompts(tokenizer, problems: list[Problem], context: str, template: str,
                           concise_instruction: str) -> TeacherPrompts:
    spec = CONTEXTS[context]
    return TeacherPrompts(
        student=[render_prompt(tokenizer, p.problem) for p in problems],
        teacher=[render_prompt(tokenizer, teacher_user_message(p, context, template, concise_instruction))
                 for p in problems],
        reference_only=[render_prompt(tokenizer, reference_only_message(p)) for p in problems] if spec.purified else None,
    )


def rollout_teacher_prompts(context: str, engine, tokenizer, kept, problems: list[Problem], prompts: TeacherPrompts,
                            memo_instruction: str, memo_max_tokens: int) -> tuple[list[list[int]], list[str] | None]:
    """The teacher prompt of each kept (rollout, correct) pair: its problem's, or (context=memo) one
    holding the memo the model writes about this very attempt; and the memos (None without)."""
    if not CONTEXTS[context].writes_memo:
        return [prompts.teacher[r.problem_index] for r, _ in kept], None
    memos = write_memos(engine, tokenizer, [r for r, _ in kept], [c for _, c in kept], problems,
                        memo_instruction, memo_max_tokens)
    return [render_prompt(tokenizer, memo_teacher_message(problems[r.problem_index], text))
            for (r, _), text in zip(kept, memos)], memos


def teacher_target(context: str, purified: tuple[float, float], model, weights: TeacherWeightsState,
                   external: ExternalTeacher | None, batch, teacher_prompts: list[list[int]], prompts: TeacherPrompts,
                   pad_id: int, device: torch.device, autocast, gathered=contextlib.nullcontext()
                   ) -> Callable[[slice], torch.Tensor]:
    """The teacher of one micro-batch as a function from a slice of response positions to [C × V]
    logits: one view (its prompt ‖ the responses) projected by the teacher's head, or Purified OPSD's
    target from three views (`purified`: clip c and β). Hidden states are computed here, once,
    without autograd. `gathered`: the block that makes the self-teacher's weights whole (FSDP),
    entered with the teacher's weights swapped in."""
    responses = [r.response_ids for r, _ in batch]
    views = [teacher_prompts]
    if CONTEXTS[context].purified:
        views += [[prompts.reference_only[r.problem_index] for r, _ in batch],
                  [prompts.student[r.problem_index] for r, _ in batch]]
    model.eval()
    head = None
    with weights.active(), gathered, autocast:
        hidden = [view_hidden(model, external, view, responses, pad_id, device) for view in views]
        if external is None and weights.sharded:  # FSDP: the head is whole only in here; the target needs it after
            head = output_head(model).detach().clone()
    if head is None:
        head = external.head() if external is not None else weights.head()
    if CONTEXTS[context].purified:
        return PurifiedTarget(*hidden, head, *purified)
    return lambda part: hidden[0][part] @ head.T


def view_hidden(model, external: ExternalTeacher | None, prompts: list[list[int]], responses: list[list[int]],
                pad_id: int, device: torch.device) -> torch.Tensor:
    """[N × H] hidden states of one teacher view (prompts ‖ the student's responses), no autograd;
    the self-teacher's weights are the network's now (inside `TeacherWeightsState.active`)."""
    if external is not None:
        return external.hidden(pack(prompts, responses, pad_id, external.device))
    return teacher_hidden(model, pack(prompts, responses, pad_id, device))


def teacher_hidden(model: nn.Module, packed: Packed) -> torch.Tensor:
    """[N × H] hidden states of `model` as it is at the response positions, computed without autograd."""
    with torch.inference_mode():
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


def load_external_teacher(model_config, device_name: str, student_tokenizer, student_device: torch.device,
                          resolve_device) -> ExternalTeacher:
    """The external teacher on its device (`device_name`, "" = the student's), after checking it
    shares the student's tokenizer."""
    teacher_tokenizer = load_tokenizer(model_config)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(f"the teacher's vocabulary ({len(teacher_tokenizer)} tokens) differs from the student's "
                        f"({len(student_tokenizer)} tokens): on-policy distillation needs the same tokenizer")
    teacher_device = resolve_device(device_name) if device_name else student_device
    return ExternalTeacher(load_model(model_config, teacher_device), student_device)


def check_same_vocabulary(student, external: ExternalTeacher | None) -> None:
    if external is None:
        return
    rows_s, rows_t = output_head(student).shape[0], external.head().shape[0]
    if rows_s != rows_t:
        raise UserError(f"the teacher's output layer has {rows_t} rows and the student's {rows_s}: "
                        "the vocabularies differ")
