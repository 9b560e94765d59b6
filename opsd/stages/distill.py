"""`opsd distill`: on-policy self-distillation (OPSD, OPSDC, "OPSD compresses"; METHODS.md §1–§3).

One step, top to bottom:
  1. sample n responses per problem from the student on the problem-only prompt (every prompt, the student's,
     the teacher's and the memo's, rendered with the `prompt` section alike: opsd/core/prompts.py);
  2. grade them against the gold answers;
  3. gate (all / correct_only / incorrect_only / correct_and_truncated) before any teacher compute;
  4. for each micro-batch of kept rollouts: teacher forward (same network, privileged prompt,
     teacher weights, no autograd) and student forward on the same response tokens;
     per-token divergence over the full vocabulary in chunks from final hidden states;
     token-mean over the step's kept tokens; backward;
  5. clip the gradient norm (a non-finite norm skips the step and is counted), AdamW step,
     schedule, teacher-weights update (refresh / EMA);
  6. log metrics and `samples_per_step` rollouts (samples.jsonl: prompt, response, grade, gate, the
     teacher's prompt as rendered, per-sequence divergence); save a Hugging Face checkpoint every
     `run.save_every` steps and at the end.

Deviations from the papers: the teacher's user turn wordings are ours (opsd/teacher/contexts.py). The loop
runs unchanged under `torchrun`: each process takes its share of the step's problems, the student
backbone is wrapped as `run.parallel` says (DDP, or FSDP2 with the weights gathered for generation
and the teacher's forward: opsd/runtime/distributed.py), only rank 0 writes, and the token mean is over the
kept tokens of all processes; metrics and samples cover every process (runtime/metrics.py). Sampling goes through the
generation engine (`sampling.engine`), grading through the verifiers (a row's `verifier`), the
teacher's prompts and target through opsd/teacher/target.py.

    opsd distill configs/tiny.yaml run.steps=5 loss.kind=forward_kl
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd.core.data import Fields, Problem, load_problems
from opsd.core.errors import UserError, require
from opsd.core.models import ModelConfig, model_config, output_head
from opsd.core.packing import pack, per_sequence_mean, response_hidden
from opsd.core.prompts import PromptConfig
from opsd.generation import SamplingConfig, check_sampling, request_seed
from opsd.generation.rollouts import (
    Rollout,
    collect_rollouts,
    pick,
    render,
    response_texts,
    rollout_rows,
)
from opsd.objectives.divergence import (
    DivergenceKind,
    DivergenceSpec,
    Estimator,
    chunked_divergence_to,
)
from opsd.objectives.gating import Gating, gate
from opsd.objectives.logprobs import gap_tally, logprob_gap
from opsd.objectives.purified import PurifiedTarget
from opsd.runtime import distributed
from opsd.runtime.metrics import Tally
from opsd.runtime.runs import RunConfig, check_run
from opsd.runtime.training import (
    OptimConfig,
    Timer,
    autocast,
    check_optim,
    guarded_step,
    step_items,
)
from opsd.stages.session import Needs, Session, StepResult, begin, check, session
from opsd.teacher.contexts import CONCISE_INSTRUCTION, CONTEXTS, TeacherContext, Wording
from opsd.teacher.memo import MEMO_INSTRUCTION, memo_positions
from opsd.teacher.target import (
    Teacher,
    TeacherPrompts,
    check_teacher_tokenizer,
    load_external_teacher,
    render_teacher_prompts,
)
from opsd.teacher.weights import TeacherWeightsConfig
from opsd.verifiers import (
    ANSWER_FREE,
    VerifierConfig,
    check_problems,
    check_verifier,
    gradable,
)


@dataclass(frozen=True)
class DataConfig:
    path: str = "configs/examples/arithmetic.jsonl"  # JSONL (.jsonl/.json) or Parquet file of problems
    fields: Fields = field(default_factory=Fields)  # column names for problem/answer/solution/id
    shuffle: bool = True  # reshuffle the problems every epoch


@dataclass(frozen=True)
class TeacherConfig:
    context: TeacherContext = "reference"  # reference | answer | concise | template | memo | purified
    #   (teacher/contexts.py)
    template: str = "{problem}\n\nReference solution:\n{solution}"  # user turn for context=template
    concise_instruction: str = CONCISE_INSTRUCTION  # instruction for context=concise
    memo_instruction: str = MEMO_INSTRUCTION  # what the model is asked to write (context=memo)
    memo_max_tokens: int = 256  # length budget of a memo
    purified_clip: float = 10.0  # c of Purified OPSD's soft clip c·tanh(Δ/c)
    purified_beta: float = 1.0  # β of the purified target softmax(log P0 + Δ̃/β)
    weights: TeacherWeightsConfig = field(default_factory=TeacherWeightsConfig)  # frozen/refresh/ema/live
    model: ModelConfig | None = None  # an external teacher checkpoint (same tokenizer); null = the student's network
    device: str = ""  # device of the external teacher ("" = the student's)


@dataclass(frozen=True)
class LossConfig:
    kind: DivergenceKind = "reverse_kl"  # reverse_kl | forward_kl | jsd | branched
    beta: float = 0.5  # JSD mixture weight (0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0  # logit temperature for both sides (OPSD: 1.1)
    clip_tau: float | None = None  # cap on each (position, vocab) term before summing (OPSD: 0.05)
    estimator: Estimator = "full"  # full | topk | sampled
    top_k: int = 64  # entries kept by estimator=topk


@dataclass(frozen=True)
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the student (folder, hub name, builtin:tiny)
    data: DataConfig = field(default_factory=DataConfig)  # the problems with their answers and reference solutions
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # how rollouts are sampled
    gating: Gating = "all"  # all | correct_only | incorrect_only | correct_and_truncated
    samples_per_step: int = 4  # rollouts per step saved to samples.jsonl with their teacher prompt (0: none)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # what the teacher sees, its weights, its model
    loss: LossConfig = field(default_factory=LossConfig)  # the divergence between student and teacher
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # how rollouts are graded
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(chunk_size=256))  # AdamW, schedule, memory knobs
    prompt: PromptConfig = field(default_factory=PromptConfig)  # chat template options, system prompt, instruction:
    #   the student's, the teacher's and the memo's prompts alike
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/distill"))  # the run contract


def check_options(config: DistillConfig, world: int = 1) -> None:
    """Out-of-range and contradictory options, refused before any work starts."""
    loss, weights, teacher = config.loss, config.teacher.weights, config.teacher
    context = CONTEXTS[teacher.context]
    require(
        ("loss.beta", 0.0 <= loss.beta <= 1.0, "in [0, 1]"),
        ("loss.temperature", loss.temperature > 0, "positive"),
        ("loss.top_k", loss.top_k >= 1, "at least 1"),
        ("loss.clip_tau", loss.clip_tau is None or math.isfinite(loss.clip_tau), "a finite number or null"),
        ("teacher.weights.refresh_every", weights.refresh_every >= 1, "at least 1"),
        ("teacher.weights.ema_decay", 0.0 <= weights.ema_decay < 1.0, "in [0, 1)"),
        ("teacher.memo_max_tokens", teacher.memo_max_tokens >= 1, "at least 1"),
        ("teacher.purified_clip", teacher.purified_clip > 0, "positive"),
        ("teacher.purified_beta", teacher.purified_beta > 0, "positive"),
        ("samples_per_step", config.samples_per_step >= 0, "non-negative (0: no samples.jsonl)"),
    )
    check_run(config.run, world)
    check_optim(config.optim)
    check_sampling(config.sampling, "sampling", config.run.device)
    check_verifier(config.verifier)
    if loss.estimator == "sampled" and loss.clip_tau is not None:
        raise UserError("loss.clip_tau applies to the full and topk estimators, not to loss.estimator=sampled")
    if loss.estimator == "sampled" and loss.kind != "reverse_kl":
        raise UserError("loss.estimator=sampled estimates the reverse KL only; set loss.kind=reverse_kl")
    context.check(wording(config))
    if context.purified and weights.policy != "frozen":
        raise UserError("teacher.context=purified uses three frozen views; set teacher.weights.policy=frozen")
    if teacher.model is not None and weights.policy != "frozen":
        raise UserError("an external teacher (teacher.model) is frozen; set teacher.weights.policy=frozen")
    if teacher.model is not None and teacher.model.lora_rank > 0:
        raise UserError("teacher.model.lora_rank must be 0: the external teacher is not trained")
    if config.model.dtype in ("bfloat16", "float16") and config.model.lora_rank == 0:
        raise UserError(f"model.dtype={config.model.dtype} would train the weights in {config.model.dtype} without a "
                        "float32 master copy; use model.dtype=float32 (bf16 autocast stays on with optim.bf16) or LoRA")


def wording(config: DistillConfig) -> Wording:
    return Wording(config.teacher.template, config.teacher.concise_instruction)


def needs_answers(config: DistillConfig) -> bool:
    return config.gating != "all" or config.loss.kind == "branched" or CONTEXTS[config.teacher.context].needs_answer


def run_distill(config: DistillConfig, name: str = "distill", check_only: bool = False) -> Path | None:
    """Train; return the run folder (None on ranks other than 0). Everything a user can get wrong is
    checked before the folder is created. `name` labels the progress bar (a pipeline: the stage's);
    `check_only` (`--check`): every check that needs no weights, then return None."""
    begun = begin(config, check_options)
    problems = load_problems(config.data.path, config.data.fields, require_answer=needs_answers(config),
                             default_verifier=config.verifier.default, answer_free=ANSWER_FREE)
    check_problems(problems, config.data.path, config.verifier)
    teacher, context, tokenizer = config.teacher, CONTEXTS[config.teacher.context], begun.tokenizer
    prompts = render_teacher_prompts(tokenizer, problems, context, wording(config), config.prompt)
    if check_only:
        if teacher.model:
            check_teacher_tokenizer(teacher.model, tokenizer)
        external_config = model_config(teacher.model) if teacher.model else None
        return check(config, needs(config, problems, prompts, None, tokenizer), external_config, check_only)
    external = load_external_teacher(teacher.model, teacher.device, tokenizer, begun.device, distributed.device,
                                     config.optim.bf16) if teacher.model else None
    with session(config, name, "distill", begun, needs(config, problems, prompts, external, tokenizer)) as s:
        target = Teacher(context, s.model, s.shadow, external, (teacher.purified_clip, teacher.purified_beta),
                         tokenizer.pad_token_id, s.device, lambda: autocast(config.optim, s.device),
                         flat=config.optim.micro_batch_tokens > 0, prompt=config.prompt)
        for step in s.steps():
            order = step_items(len(problems), step, config.run.problems_per_step, config.data.shuffle, config.run.seed)
            mine = s.my_share(order)  # this process's places in the step
            indices = [order[p] for p in mine]
            # seeded by the place in the step, not the process: the same samples on any number of processes
            seeds = [request_seed(config.run.seed, step, p) for p in mine]
            result = train_step(config, s, target, [problems[i] for i in indices], prompts.select(indices), seeds)
            result.metrics["teacher/updated"] = s.shadow.after_step(step) if s.shadow is not None else False
            s.end_step(step, result)
    return s.run_dir


def needs(config: DistillConfig, problems: list[Problem], prompts: TeacherPrompts, external, tokenizer) -> Needs:
    """What the session builds for this run: the lengths the policy and the engine must hold (the
    longest prompt of any view plus the response budget; memos), the teacher's weights, grading."""
    teacher, budget = config.teacher, config.sampling.max_new_tokens
    memo = teacher.memo_max_tokens if CONTEXTS[teacher.context].writes_memo else 0
    longest = max(len(p) for p in [*prompts.student, *prompts.teacher, *(prompts.reference_only or [])]) + memo
    fits = [(longest + budget, f"the longest prompt ({longest} tokens) plus sampling.max_new_tokens ({budget})")]
    # what the engine decodes: the student's prompts and responses, and the memo prompts and memos
    student = max(len(p) for p in prompts.student)
    engine_positions = student + budget
    what = f"the longest student prompt ({student} tokens) plus sampling.max_new_tokens ({budget})"
    if memo:
        memos = memo_positions(tokenizer, problems, teacher.memo_instruction, budget, memo, config.prompt)
        fits.append((memos, f"the longest memo prompt with a response of sampling.max_new_tokens ({budget}) "
                            f"plus teacher.memo_max_tokens ({memo})"))
        if memos > engine_positions:
            engine_positions, what = memos, f"the longest memo prompt plus teacher.memo_max_tokens ({memo})"
    return Needs(fits=tuple(fits), shadow=teacher.weights if external is None else None, external=external,
                 sampling=config.sampling, engine_positions=engine_positions, engine_what=what,
                 verifier=config.verifier, samples_per_step=config.samples_per_step)


@dataclass(frozen=True)
class Kept:
    """A rollout the gate kept, with its grade."""

    rollout: Rollout
    correct: bool


def train_step(config: DistillConfig, s: Session, teacher: Teacher, problems: list[Problem], prompts: TeacherPrompts,
               seeds: list[int]) -> StepResult:
    """One optimizer step: sample → grade → gate → (memo) → teacher/student → backward → step; its
    metrics and the samples.jsonl rows of `samples_per_step` of its rollouts."""
    timer, started = Timer(), time.perf_counter()
    s.model.eval()
    with timer("generate"):
        s.engine.ready()  # every process: the trainer's weights into the engine if they changed
        with s.engine.decoding():
            rollouts = collect_rollouts(s.engine, prompts.student, config.sampling, seeds)
    with timer("grade"):
        verdicts = s.verifiers.verify(response_texts(s.tokenizer, rollouts),
                                      [problems[r.problem_index] for r in rollouts])
    correct = [v.correct for v in verdicts]
    keep = gate(correct, [r.truncated for r in rollouts], config.gating)
    kept = [Kept(r, c) for r, c, k in zip(rollouts, correct, keep) if k]
    with timer("memo"), s.engine.decoding() if teacher.context.writes_memo else contextlib.nullcontext():
        teacher_prompts, memos = teacher.rollout_prompts(s.engine, s.tokenizer, kept, problems, prompts,
                                                         config.teacher.memo_instruction,
                                                         config.teacher.memo_max_tokens)
    s.engine.idle()  # vllm's sleep mode: its memory back while the teacher and the student run
    kept_tokens = sum(len(k.rollout.response_ids) for k in kept)
    total_tokens = distributed.sum_over_ranks(kept_tokens)
    s.optimizer.zero_grad(set_to_none=True)
    sums, divergence_K = distill_kept(config, s, teacher, kept, teacher_prompts, prompts, total_tokens, timer)
    grad_norm, skipped = guarded_step(s.model, s.optimizer, config.optim.max_grad_norm, has_gradient=total_tokens > 0)
    lengths = [len(r.response_ids) for r in rollouts]
    rows = sample_rows(s.tokenizer, s.samples.per_step, rollouts, problems, verdicts, keep, teacher_prompts, memos,
                       divergence_K, prompts)
    # every process's part of the step, reduced over the processes (runtime/metrics.py Tally)
    tally = Tally()
    for name, key in (("loss/divergence", "divergence"), ("loss/clipped_ratio", "clipped"),
                      ("loss/student_entropy", "entropy"),
                      *((("purified/gap_cosine", "gap_cosine"), ("purified/gap_norm_ratio", "gap_norm_ratio"))
                        if teacher.context.purified else ())):
        tally.mean(name, sums[key], kept_tokens)
    if all(gradable(p, config.verifier.default) for p in problems):
        tally.mean("rollout/accuracy", sum(correct), len(correct))
    else:
        tally.same("rollout/accuracy", float("nan"))
    tally.sum("rollout/count", len(rollouts))
    tally.sum("rollout/restated", sum(v.restated for v in verdicts))
    tally.sum("rollout/kept", len(kept))
    tally.mean("rollout/response_tokens_mean", sum(lengths), len(lengths))
    tally.max("rollout/response_tokens_max", max(lengths, default=float("nan")))
    tally.mean("rollout/truncated_ratio", sum(r.truncated for r in rollouts), len(rollouts))
    gap_tally(tally, sums["logprob_gap"], int(sums["logprob_gap_outside"]), kept_tokens,
              config.sampling.temperature > 0)
    tally.same("optim/grad_norm", grad_norm)
    tally.same("optim/lr", s.optimizer.param_groups[0]["lr"])
    tally.same("optim/empty_step", total_tokens == 0)
    tally.same("train/tokens", total_tokens)
    for phase in ("generate", "grade", "memo", "teacher", "student"):
        tally.max(f"time/{phase}_s", timer.total(phase))
    tally.max("time/step_s", time.perf_counter() - started)
    tally.rate("throughput/generate_tokens_per_s", sum(lengths), timer.total("generate"))
    tally.rate("throughput/train_tokens_per_s", kept_tokens, timer.total("teacher") + timer.total("student"))
    metrics = tally.reduce()
    accuracy = metrics["rollout/accuracy"]
    why_empty = f"gating={config.gating} kept none of the {len(rollouts)} rollouts; rollout accuracy {accuracy:.2f}"
    return StepResult(metrics, skipped, total_tokens, rows=rows, why_empty=why_empty,
                      postfix={"div": metrics["loss/divergence"], "acc": accuracy,
                               "len": metrics["rollout/response_tokens_mean"]})


def sample_rows(tokenizer, wanted: int, rollouts, problems: list[Problem], verdicts, keep: list[bool],
                teacher_prompts: list[list[int]], memos: list[str] | None, divergence_K: list[float],
                prompts: TeacherPrompts) -> list[dict]:
    """samples.jsonl rows of `wanted` of the step's rollouts: what every stage saves, whether the gate
    kept it and, for a kept one, the teacher's prompt as rendered (context=memo: the memo in it, and on
    its own; purified: πR's view too, the third view being `prompt`) and the divergence, its mean over
    the response tokens. A rollout the gate dropped never met the teacher: those fields are null."""
    picked = pick(len(rollouts), wanted)
    rows = rollout_rows(tokenizer, rollouts, problems, verdicts, picked)
    place = {index: k for k, index in enumerate(i for i, kept in enumerate(keep) if kept)}  # its place among kept
    for row, index in zip(rows, picked):
        k = place.get(index)
        row["kept"] = k is not None
        row["teacher_prompt"] = None if k is None else render(tokenizer, teacher_prompts[k])
        if memos is not None:
            row["memo"] = None if k is None else memos[k]
        if prompts.reference_only is not None:
            reference_only = prompts.reference_only[rollouts[index].problem_index]
            row["reference_only_prompt"] = None if k is None else render(tokenizer, reference_only)
        row["divergence"] = None if k is None else divergence_K[k]
    return rows


def distill_kept(config: DistillConfig, s: Session, teacher: Teacher, kept: list[Kept],
                 teacher_prompts: list[list[int]],
                 prompts: TeacherPrompts, total_tokens: int, timer: Timer) -> tuple[dict[str, float], list[float]]:
    """Teacher target and student forward per micro-batch of kept rollouts, divergence, backward;
    gradients accumulate (token mean over the whole step). Sums of the per-token metrics, and each
    kept rollout's divergence averaged over its response tokens (from the same forward)."""
    # token mean over the whole step: DDP and FSDP average gradients over processes, hence the factor world
    token_weight = s.world / max(total_tokens, 1)
    sums: dict[str, float] = collections.defaultdict(float)
    divergence_K: list[float] = []
    loss, flat = config.loss, config.optim.micro_batch_tokens > 0
    spec = DivergenceSpec(loss.kind, loss.beta, loss.temperature, loss.clip_tau, loss.estimator, loss.top_k,
                          config.optim.chunk_size)
    for places in s.micro_batches(list(range(len(kept))), forward_positions(kept, teacher_prompts, prompts)):
        batch = [kept[k] for k in places]
        # FSDP: the self-teacher's weights are gathered whole for its forward (an external one is not sharded)
        gathered = distributed.gathered(s.backbone) if teacher.external is None else contextlib.nullcontext()
        if not batch:  # this process has run out: zero-weight passes keep the collectives in step
            if teacher.weights is not None:
                with teacher.weights.active(), gathered:  # its shards of the teacher's weights, for the others
                    pass
            s.idle_pass()
            continue
        with timer("teacher"):
            target = teacher.target(batch, [teacher_prompts[k] for k in places], prompts, gathered)
        with timer("student"):
            s.model.train()
            packed = pack([prompts.student[k.rollout.problem_index] for k in batch],
                          [k.rollout.response_ids for k in batch], s.tokenizer.pad_token_id, s.device, flat)
            with autocast(config.optim, s.device):
                hidden_N_H = response_hidden(s.backbone, packed)
            reverse_N = torch.tensor([k.correct for k in batch], device=s.device)[packed.row_N]
            result = chunked_divergence_to(
                hidden_N_H, output_head(s.model), target,
                torch.full_like(packed.targets_N, token_weight, dtype=torch.float32), packed.targets_N,
                reverse_N if loss.kind == "branched" else None, spec)
            # before the backward: under FSDP the head is whole until then
            gap, outside = logprob_gap(hidden_N_H, output_head(s.model), packed.targets_N,
                                       [k.rollout.sample_logprobs for k in batch], config.sampling,
                                       config.optim.chunk_size)
            sums["logprob_gap"] += gap
            sums["logprob_gap_outside"] += outside
            result.loss.backward()
        sums["divergence"] += float(result.value_N.sum())
        divergence_K += per_sequence_mean(result.value_N.detach(), packed.row_N, len(batch)).tolist()
        sums["entropy"] += float(result.entropy_N.sum())
        sums["clipped"] += float(result.clipped_N.float().sum())
        if isinstance(target, PurifiedTarget):
            sums["gap_cosine"] += float(torch.cat(target.cosines).sum())
            sums["gap_norm_ratio"] += float(torch.cat(target.norm_ratios).sum())
    return sums, divergence_K


def forward_positions(kept: list[Kept], teacher_prompts: list[list[int]], prompts: TeacherPrompts) -> list[int]:
    """The positions each kept rollout takes in the longest forward it is part of: its response after
    the longest of its prompts (the student's, the teacher's and, purified, πR's), so that with
    `optim.micro_batch_tokens` no forward of a micro-batch, the student's or a teacher view's, holds more."""
    positions = []
    for k, teacher_prompt in zip(kept, teacher_prompts):
        problem = k.rollout.problem_index
        views = [prompts.student[problem], teacher_prompt]
        if prompts.reference_only is not None:
            views.append(prompts.reference_only[problem])
        positions.append(len(k.rollout.response_ids) + max(len(view) for view in views))
    return positions
