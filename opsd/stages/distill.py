"""`opsd distill`: on-policy self-distillation (OPSD, OPSDC, "OPSD compresses"; METHODS.md §1–§3).

One step, top to bottom:
  1. sample n responses per problem from the student on the problem-only prompt;
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

Deviations from the papers: the teacher's user turn wordings are ours (opsd/core/prompts.py). The loop
runs unchanged under `torchrun`: each process takes its share of the step's problems, the student
backbone is wrapped as `run.parallel` says (DDP, or FSDP2 with the weights gathered for generation
and the teacher's forward: opsd/runtime/distributed.py), only rank 0 writes, and the token mean is over the
kept tokens of all processes. Metrics are rank 0's own rollouts. Sampling goes through the
generation engine (`sampling.engine`), grading through the verifiers (a row's `verifier`), the
teacher's prompts and target through opsd/teacher/target.py.

    opsd distill configs/tiny.yaml run.steps=5 loss.kind=forward_kl
"""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd.runtime import distributed
from opsd.runtime.checkpoint import checkpoint_or_stop, restore, start_model
from opsd.core.config import to_dict
from opsd.core.data import Fields, Problem, load_problems
from opsd.objectives.divergence import DivergenceKind, Estimator, chunked_divergence_to
from opsd.core.errors import UserError, require
from opsd.objectives.gating import Gating, gate
from opsd.generation import (Engine, SamplingConfig, check_engine_fits, check_sampling, closing_on_error,
                             make_engine, request_seed)
from opsd.objectives.logprobs import gap_metrics, logprob_gap
from opsd.teacher.memo import MEMO_INSTRUCTION, memo_positions
from opsd.runtime.metrics import MetricsLog
from opsd.core.models import ModelConfig, check_fits, load_tokenizer, output_head
from opsd.core.packing import pack, per_sequence_mean, response_hidden
from opsd.core.prompts import CONCISE_INSTRUCTION, TeacherContext, check_template
from opsd.objectives.purified import PurifiedTarget
from opsd.generation.rollouts import collect_rollouts, grade_rollouts
from opsd.runtime.runs import RunConfig, check_run, open_run_dir, resume_point, use_threads
from opsd.runtime.samples import SamplesLog, pick, render, rollout_rows
from opsd.teacher.target import (CONTEXTS, ExternalTeacher, TeacherPrompts, TeacherWeightsConfig, TeacherWeightsState,
                          check_same_vocabulary, load_external_teacher, render_teacher_prompts, rollout_teacher_prompts,
                          start_snapshot, teacher_target)
from opsd.runtime.training import (OptimConfig, Timer, advance, autocast, check_optim, compute_dtype, guarded_step, load_policy,
                           make_optimizer, new_progress, set_lr, stage_summary, step_items, wrap_policy)
from opsd.verifiers import VerifierConfig, Verifiers, check_problems, check_verifier, gradable


@dataclass(frozen=True)
class DataConfig:
    path: str = "configs/examples/arithmetic.jsonl"  # JSONL (.jsonl/.json) or Parquet file of problems
    fields: Fields = field(default_factory=Fields)  # column names for problem/answer/solution/id
    shuffle: bool = True  # reshuffle the problems every epoch


@dataclass(frozen=True)
class TeacherConfig:
    context: TeacherContext = "reference"  # reference | answer | concise | template | memo | purified
    template: str = "{problem}\n\nReference solution:\n{solution}"  # user turn for context=template
    concise_instruction: str = CONCISE_INSTRUCTION  # instruction for context=concise
    memo_instruction: str = MEMO_INSTRUCTION  # what the model is asked to write (context=memo)
    memo_max_tokens: int = 256  # length budget of a memo
    purified_clip: float = 10.0  # c of Purified OPSD's soft clip c·tanh(Δ/c)
    purified_beta: float = 1.0  # β of the purified target softmax(log P0 + Δ̃/β)
    weights: TeacherWeightsConfig = field(default_factory=TeacherWeightsConfig)
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
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    gating: Gating = "all"  # all | correct_only | incorrect_only | correct_and_truncated
    samples_per_step: int = 4  # rollouts per step saved to samples.jsonl with their teacher prompt (0: none)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(chunk_size=256))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/distill"))


def check_options(config: DistillConfig, world: int = 1) -> None:
    """Out-of-range and contradictory options, refused before any work starts."""
    loss, weights, teacher = config.loss, config.teacher.weights, config.teacher
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
    if teacher.context == "template":
        check_template(teacher.template, "teacher.template")
    if CONTEXTS[teacher.context].purified and weights.policy != "frozen":
        raise UserError("teacher.context=purified uses three frozen views; set teacher.weights.policy=frozen")
    if teacher.model is not None and weights.policy != "frozen":
        raise UserError("an external teacher (teacher.model) is frozen; set teacher.weights.policy=frozen")
    if teacher.model is not None and teacher.model.lora_rank > 0:
        raise UserError("teacher.model.lora_rank must be 0: the external teacher is not trained")
    if config.model.dtype in ("bfloat16", "float16") and config.model.lora_rank == 0:
        raise UserError(f"model.dtype={config.model.dtype} would train the weights in {config.model.dtype} without a "
                        "float32 master copy; use model.dtype=float32 (bf16 autocast stays on with optim.bf16) or LoRA")


def needs_answers(config: DistillConfig) -> bool:
    return config.gating != "all" or config.loss.kind == "branched" or CONTEXTS[config.teacher.context].needs_answer


@dataclass(frozen=True)
class Parts:
    """What a step works with (built once by `run_distill`)."""

    model: torch.nn.Module  # the student (PEFT-wrapped with LoRA)
    backbone: torch.nn.Module  # its final hidden states, wrapped by run.parallel under torchrun
    optimizer: torch.optim.Optimizer
    engine: Engine  # samples rollouts and memos
    weights: TeacherWeightsState  # the self-teacher's weights
    external: ExternalTeacher | None  # or another checkpoint as the teacher
    tokenizer: object
    verifiers: Verifiers
    device: torch.device


def run_distill(config: DistillConfig, name: str = "distill") -> Path | None:
    """Train; return the run folder (None on ranks other than 0). Everything a user can get wrong is
    checked before the folder is created. `name` labels the progress bar (a pipeline: the stage's)."""
    world = distributed.world_size()
    check_options(config, world)
    use_threads(config.run.threads)
    resume_from = resume_point(config.run, to_dict(config), type(config))
    problems = load_problems(config.data.path, config.data.fields, require_answer=needs_answers(config),
                             default_verifier=config.verifier.default)
    check_problems(problems, config.data.path, config.verifier)
    device = distributed.device(config.run.device)
    tokenizer = load_tokenizer(config.model)
    teacher = config.teacher
    prompts = render_teacher_prompts(tokenizer, problems, teacher.context, teacher.template, teacher.concise_instruction)
    external = load_external_teacher(teacher.model, teacher.device, tokenizer, device, distributed.device) \
        if teacher.model else None
    rank = distributed.setup(device, cpu_collectives=config.run.fsdp_offload)
    torch.manual_seed(config.run.seed)  # the same on every process: FSDP shards each one's own LoRA initialisation
    model = load_policy(config.model, config.optim, device)
    check_same_vocabulary(model, external)
    memo = teacher.memo_max_tokens if CONTEXTS[teacher.context].writes_memo else 0
    longest = max(len(p) for p in [*prompts.student, *prompts.teacher, *(prompts.reference_only or [])]) + memo
    budget = config.sampling.max_new_tokens
    check_fits(model, longest + budget, f"the longest prompt ({longest} tokens) plus sampling.max_new_tokens ({budget})")
    # what the engine decodes: the student's prompts and responses, and the memo prompts and memos
    student = max(len(p) for p in prompts.student)
    engine_positions = student + budget
    what = f"the longest student prompt ({student} tokens) plus sampling.max_new_tokens ({budget})"
    if memo:
        memos = memo_positions(tokenizer, problems, teacher.memo_instruction, budget, memo)
        check_fits(model, memos, f"the longest memo prompt with a response of sampling.max_new_tokens ({budget}) "
                                 f"plus teacher.memo_max_tokens ({memo})")
        if memos > engine_positions:
            engine_positions, what = memos, f"the longest memo prompt plus teacher.memo_max_tokens ({memo})"
    check_engine_fits(config.sampling, "sampling", engine_positions, what)
    uses_lora = config.model.lora_rank > 0
    start = start_model(config.model, model, start_snapshot(model, teacher.weights, uses_lora))
    backbone = wrap_policy(model, device, config.run.parallel, config.run.fsdp_offload, config.optim)
    weights = TeacherWeightsState(model, teacher.weights, uses_lora=uses_lora)
    optimizer = make_optimizer(model, config.optim)
    progress = restore(resume_from, model, optimizer, start, weights) if resume_from else new_progress()
    # before the run folder: vLLM refuses a model it cannot serve here
    engine = make_engine(model, tokenizer, config.sampling, device, compute_dtype(config.optim, device),
                         lambda: distributed.gathered(backbone), engine_positions)
    run_dir = closing_on_error(engine, lambda: open_run_dir(config.run, to_dict(config), rank, progress["step"]))
    with engine, Verifiers(config.verifier) as verifiers, \
            SamplesLog(run_dir, config.samples_per_step, resumed_step=progress["step"]) as samples, \
            MetricsLog(run_dir, config.run.steps, config.run.report_to, done=progress["step"], name=name,
                       config=to_dict(config)) as log:
        parts = Parts(model, backbone, optimizer, engine, weights, external,
                      tokenizer, verifiers, device)
        for step in range(progress["step"] + 1, config.run.steps + 1):
            set_lr(optimizer, config.optim, step, config.run.steps)
            order = step_items(len(problems), step, config.run.problems_per_step, config.data.shuffle, config.run.seed)
            positions = distributed.shard(list(range(len(order))), rank, world)  # this process's share of the step
            indices = [order[p] for p in positions]
            # seeded by the place in the step, not the process: the same samples on any number of processes
            seeds = [request_seed(config.run.seed, step, p) for p in positions]
            metrics, rows = train_step(config, parts, [problems[i] for i in indices], prompts.select(indices), seeds,
                                       samples.per_step)
            progress = advance(progress, step, metrics.pop("skipped"), metrics["train/tokens"])
            parts.engine.update_weights()
            metrics.update({"optim/skipped_steps": progress["skipped"], "teacher/updated": weights.after_step(step)})
            samples.write(step, rows)
            log.write(step, metrics, postfix={"div": metrics["loss/divergence"], "acc": metrics["rollout/accuracy"],
                                              "len": metrics["rollout/response_tokens_mean"]})
            why_empty = (f"gating={config.gating} kept none of the {metrics['rollout/count']} rollouts; rollout "
                         f"accuracy {metrics['rollout/accuracy']:.2f}")
            if metrics["optim/empty_step"] and progress["empty"] == 1:
                log.say(f"opsd: warning: step {step} had nothing to train on ({why_empty})")
            checkpoint_or_stop(run_dir, config.run, config.optim.max_skipped_in_a_row, model, tokenizer, optimizer,
                               progress, "distill", start, weights.checkpoint_state(), why_empty)
        del parts, backbone  # release DDP's reducer / FSDP's state before the process group (see distributed.teardown)
    if run_dir is not None:
        print(stage_summary("distill", progress), file=sys.stderr)
    distributed.teardown()
    return run_dir


def train_step(config: DistillConfig, parts: Parts, problems: list[Problem], prompts: TeacherPrompts,
               seeds: list[int], samples_wanted: int) -> tuple[dict[str, float], list[dict]]:
    """One optimizer step: sample → grade → gate → (memo) → teacher/student → backward → step; its
    metrics and the samples.jsonl rows of `samples_wanted` of its rollouts."""
    timer, started = Timer(), time.perf_counter()
    parts.model.eval()
    # FSDP: the hf engine decodes with the trainer's module, whole for the block; vllm with its own copy
    decoding = distributed.gathered if parts.engine.reads_trainer_module else lambda _: contextlib.nullcontext()
    with timer("generate"):
        parts.engine.ready()  # every process: the trainer's weights into the engine if they changed
        with decoding(parts.backbone):
            rollouts = collect_rollouts(parts.engine, prompts.student, config.sampling, seeds)
    with timer("grade"):
        verdicts = grade_rollouts(rollouts, problems, parts.tokenizer, parts.verifiers)
    correct = [v.correct for v in verdicts]
    keep = gate(correct, [r.truncated for r in rollouts], config.gating)
    kept = [(r, c) for r, c, k in zip(rollouts, correct, keep) if k]
    writes_memo = CONTEXTS[config.teacher.context].writes_memo
    with timer("memo"), decoding(parts.backbone) if writes_memo else contextlib.nullcontext():
        teacher_prompts, memos = rollout_teacher_prompts(
            config.teacher.context, parts.engine, parts.tokenizer, kept, problems, prompts,
            config.teacher.memo_instruction, config.teacher.memo_max_tokens)
    parts.engine.idle()  # vllm's sleep mode: its memory back while the teacher and the student run
    kept_tokens = sum(len(r.response_ids) for r, _ in kept)
    total_tokens = distributed.sum_over_ranks(kept_tokens)
    parts.optimizer.zero_grad(set_to_none=True)
    sums, divergence_K = distill_kept(config, parts, kept, teacher_prompts, prompts, total_tokens, timer)
    grad_norm, skipped = guarded_step(parts.model, parts.optimizer, config.optim.max_grad_norm,
                                      has_gradient=total_tokens > 0)
    lengths = [len(r.response_ids) for r in rollouts]
    per_token = lambda key: sums[key] / kept_tokens if kept_tokens else float("nan")  # noqa: E731
    generate_s, student_s, teacher_s = timer.total("generate"), timer.total("student"), timer.total("teacher")
    rows = sample_rows(parts.tokenizer, samples_wanted, rollouts, problems, verdicts, keep, teacher_prompts, memos,
                       divergence_K, prompts)
    return {
        "loss/divergence": per_token("divergence"),
        "loss/clipped_ratio": per_token("clipped"),
        "loss/student_entropy": per_token("entropy"),
        **({"purified/gap_cosine": per_token("gap_cosine"), "purified/gap_norm_ratio": per_token("gap_norm_ratio")}
           if CONTEXTS[config.teacher.context].purified else {}),
        "rollout/accuracy": sum(correct) / len(correct) if all(gradable(p, config.verifier.default) for p in problems)
        else float("nan"),
        "rollout/count": len(rollouts),
        "rollout/restated": sum(v.restated for v in verdicts),
        "rollout/kept": len(kept),
        "rollout/response_tokens_mean": sum(lengths) / len(lengths),
        "rollout/response_tokens_max": max(lengths),
        "rollout/truncated_ratio": sum(r.truncated for r in rollouts) / len(rollouts),
        **gap_metrics(sums["logprob_gap"], int(sums["logprob_gap_outside"]), kept_tokens, config.sampling.temperature > 0),
        "optim/grad_norm": grad_norm,
        "optim/lr": parts.optimizer.param_groups[0]["lr"],
        "optim/empty_step": total_tokens == 0,
        "train/tokens": total_tokens,
        **{f"time/{phase}_s": timer.total(phase) for phase in ("generate", "grade", "memo", "teacher", "student")},
        "time/step_s": time.perf_counter() - started,
        "throughput/generate_tokens_per_s": sum(lengths) / generate_s if generate_s else float("nan"),
        "throughput/train_tokens_per_s": kept_tokens / (teacher_s + student_s) if kept_tokens else float("nan"),
        "skipped": skipped,
    }, rows


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


def distill_kept(config: DistillConfig, parts: Parts, kept, teacher_prompts: list[list[int]], prompts: TeacherPrompts,
                 total_tokens: int, timer: Timer) -> tuple[dict[str, float], list[float]]:
    """Teacher target and student forward per micro-batch of kept rollouts, divergence, backward;
    gradients accumulate (token mean over the whole step). Sums of the per-token metrics, and each
    kept rollout's divergence averaged over its response tokens (from the same forward)."""
    # token mean over the whole step: DDP and FSDP average gradients over processes, hence the factor world
    token_weight = distributed.world_size() / max(total_tokens, 1)
    sums: dict[str, float] = collections.defaultdict(float)
    divergence_K: list[float] = []
    micro, pad_id, device, loss = config.optim.micro_batch_size, parts.tokenizer.pad_token_id, parts.device, config.loss
    n_micro = distributed.max_over_ranks(math.ceil(len(kept) / micro))
    for index in range(n_micro):
        batch = kept[index * micro : (index + 1) * micro]
        with distributed.no_sync_unless(parts.backbone, last=index == n_micro - 1):
            # FSDP: the self-teacher's weights are gathered whole for its forward (an external one is not sharded)
            gathered = distributed.gathered(parts.backbone) if parts.external is None else contextlib.nullcontext()
            if not batch:  # this process has run out: zero-weight passes keep the collectives in step
                with parts.weights.active(), gathered:  # its shards of the teacher's weights, for the others
                    pass
                distributed.idle_backward(parts.backbone, parts.model, pad_id, device)
                continue
            with timer("teacher"):
                target = teacher_target(config.teacher.context, (config.teacher.purified_clip, config.teacher.purified_beta),
                                        parts.model, parts.weights, parts.external, batch,
                                        teacher_prompts[index * micro : (index + 1) * micro], prompts, pad_id, device,
                                        autocast(config.optim, device), gathered)
            with timer("student"):
                parts.model.train()
                packed = pack([prompts.student[r.problem_index] for r, _ in batch], [r.response_ids for r, _ in batch],
                              pad_id, device)
                with autocast(config.optim, device):
                    hidden_N_H = response_hidden(parts.backbone, packed)
                reverse_N = torch.tensor([c for _, c in batch], device=device)[packed.row_N]
                result = chunked_divergence_to(
                    hidden_N_H, output_head(parts.model), target,
                    torch.full_like(packed.targets_N, token_weight, dtype=torch.float32), packed.targets_N,
                    reverse_N if loss.kind == "branched" else None, chunk_size=config.optim.chunk_size, kind=loss.kind,
                    beta=loss.beta, temperature=loss.temperature, clip_tau=loss.clip_tau, estimator=loss.estimator,
                    top_k=loss.top_k)
                # before the backward: under FSDP the head is whole until then
                gap, outside = logprob_gap(hidden_N_H, output_head(parts.model), packed.targets_N,
                                           [r.sample_logprobs for r, _ in batch], config.sampling, config.optim.chunk_size)
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
