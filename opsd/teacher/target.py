"""The teacher of `opsd distill` at work: the prompts it is shown (its context: opsd/teacher/contexts.py),
the memo prompts of each kept rollout, and its target for a micro-batch of the student's responses.

`Teacher` is built once per run from the context, the teacher's weights (the self-teacher's, switched
into the student's network: opsd/teacher/weights.py) or an external checkpoint with the same
tokenizer (`ExternalTeacher`, e.g. a bigger one), and computes, without autograd, the target the
student is trained toward: one view's logits, or Purified OPSD's target from three views. Every view's
prompt is rendered with the run's `prompt` section (opsd/core/prompts.py) exactly as the student's is: the
same system prompt, template options and instruction, around the teacher's user turn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from opsd.core.data import Problem
from opsd.core.errors import UserError
from opsd.core.models import Backbone, frozen_dtype, load_model, load_tokenizer, output_head
from opsd.core.packing import Packed, pack, response_hidden
from opsd.core.prompts import PLAIN, PromptConfig, render_prompt
from opsd.objectives.purified import PurifiedTarget
from opsd.teacher.contexts import Context, Wording, reference_only_message
from opsd.teacher.memo import memo_teacher_message, write_memos
from opsd.teacher.weights import TeacherWeightsState


@dataclass(frozen=True)
class TeacherPrompts:
    """Token ids of the prompts of every problem: the student's, the teacher's and (purified) πR's."""

    student: list[list[int]]
    teacher: list[list[int]]  # context=memo: the problem alone, replaced per rollout once its memo is written
    reference_only: list[list[int]] | None  # Purified OPSD's πR view

    def select(self, indices: list[int]) -> TeacherPrompts:
        pick = lambda rows: None if rows is None else [rows[i] for i in indices]
        return TeacherPrompts(pick(self.student), pick(self.teacher), pick(self.reference_only))


def render_teacher_prompts(tokenizer, problems: list[Problem], context: Context, wording: Wording,
                           prompt: PromptConfig = PLAIN) -> TeacherPrompts:
    return TeacherPrompts(
        student=[render_prompt(tokenizer, p.problem, prompt) for p in problems],
        teacher=[render_prompt(tokenizer, context.message(p, wording), prompt) for p in problems],
        reference_only=[render_prompt(tokenizer, reference_only_message(p), prompt) for p in problems]
        if context.purified else None,
    )


@dataclass(frozen=True)
class Teacher:
    """The teacher of one run; `target` computes its target for a micro-batch of kept rollouts."""

    context: Context
    model: nn.Module  # the student's network (the self-teacher computes with its weights swapped in)
    weights: TeacherWeightsState | None  # the self-teacher's weights; None with an external teacher
    external: ExternalTeacher | None
    purified: tuple[float, float]  # Purified OPSD's clip c and β
    pad_id: int
    device: torch.device
    autocast: Callable[[], Any]  # the forward's autocast block (bf16 on GPU)
    flat: bool = False  # the student's layout: each view's sequences back to back in one row (packing.pack)
    prompt: PromptConfig = PLAIN  # the run's chat options, for the memo prompts and the memo teacher's prompts

    def rollout_prompts(self, engine, tokenizer, kept: list, problems: list[Problem], prompts: TeacherPrompts,
                        memo_instruction: str, memo_max_tokens: int) -> tuple[list[list[int]], list[str] | None]:
        """The teacher prompt of each kept rollout (`.rollout`, `.correct`): its problem's, or (a
        context that writes memos) one holding the memo the model writes about this very attempt;
        and the memos (None without)."""
        if not self.context.writes_memo:
            return [prompts.teacher[k.rollout.problem_index] for k in kept], None
        memos = write_memos(engine, tokenizer, [k.rollout for k in kept], [k.correct for k in kept], problems,
                            memo_instruction, memo_max_tokens, prompt=self.prompt)
        return [render_prompt(tokenizer, memo_teacher_message(problems[k.rollout.problem_index], text), self.prompt)
                for k, text in zip(kept, memos)], memos

    def target(self, kept: list, teacher_prompts: list[list[int]], prompts: TeacherPrompts,
               gathered=contextlib.nullcontext()) -> Callable[[slice], torch.Tensor]:
        """The teacher of one micro-batch as a function from a slice of response positions to [C × V]
        logits: one view (its prompt ‖ the responses) projected by the teacher's head, or Purified
        OPSD's target from three views. Hidden states are computed here, once, without autograd.
        `gathered`: the block that makes the self-teacher's weights whole (FSDP), entered with the
        teacher's weights swapped in."""
        responses = [k.rollout.response_ids for k in kept]
        views = [teacher_prompts]
        if self.context.purified:
            views += [[prompts.reference_only[k.rollout.problem_index] for k in kept],
                      [prompts.student[k.rollout.problem_index] for k in kept]]
        self.model.eval()
        head = None
        active = self.weights.active() if self.weights is not None else contextlib.nullcontext()
        with active, gathered, self.autocast():
            hidden = [view_hidden(self.model, self.external, view, responses, self.pad_id, self.device, self.flat)
                      for view in views]
            if self.external is None and self.weights.sharded:  # FSDP: the head is whole only in here
                head = output_head(self.model).detach().clone()
        if head is None:
            head = self.external.head() if self.external is not None else self.weights.head()
        if self.context.purified:
            return PurifiedTarget(*hidden, head, *self.purified)
        return lambda part: hidden[0][part] @ head.T


def view_hidden(model, external: ExternalTeacher | None, prompts: list[list[int]], responses: list[list[int]],
                pad_id: int, device: torch.device, flat: bool = False) -> torch.Tensor:
    """[N × H] hidden states of one teacher view (prompts ‖ the student's responses), no autograd;
    the self-teacher's weights are the network's now (inside `TeacherWeightsState.active`)."""
    if external is not None:
        return external.hidden(pack(prompts, responses, pad_id, external.device, flat))
    return teacher_hidden(model, pack(prompts, responses, pad_id, device, flat))


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
                          resolve_device, bf16: bool = True) -> ExternalTeacher:
    """The external teacher on its device (`device_name`, "" = the student's), after checking it
    shares the student's tokenizer. Frozen, it needs no float32 master copy: `dtype: auto` loads it in
    the compute dtype (bf16 on a GPU with optim.bf16: half the memory of float32, the precision its
    forward would compute in under autocast anyway)."""
    check_teacher_tokenizer(model_config, student_tokenizer)
    teacher_device = resolve_device(device_name) if device_name else student_device
    return ExternalTeacher(load_model(frozen_dtype(model_config, teacher_device, bf16), teacher_device),
                           student_device)



def check_teacher_tokenizer(model_config, student_tokenizer) -> None:
    teacher_tokenizer = load_tokenizer(model_config)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(f"the teacher's vocabulary ({len(teacher_tokenizer)} tokens) differs from the student's "
                        f"({len(student_tokenizer)} tokens): on-policy distillation needs the same tokenizer")


def check_same_vocabulary(student, external: ExternalTeacher | PretrainedConfig | None) -> None:
    """The teacher's output layer has the student's rows; `student` the model or its config, `external`
    the loaded teacher or its config (`--check`, no weights)."""
    if external is None:
        return
    rows = lambda m: m.vocab_size if isinstance(m, PretrainedConfig) else output_head(m).shape[0]
    rows_s = rows(student)
    rows_t = external.vocab_size if isinstance(external, PretrainedConfig) else external.head().shape[0]
    if rows_s != rows_t:
        raise UserError(f"the teacher's output layer has {rows_t} rows and the student's {rows_s}: "
                        "the vocabularies differ")
