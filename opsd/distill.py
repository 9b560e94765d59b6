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
  6. log metrics; save a Hugging Face checkpoint every `run.save_every` steps and at the end.

Deviations from the papers: the teacher's user turn wordings are ours (opsd/prompts.py). The loop
runs unchanged under `torchrun`: each process takes its share of the step's problems, the student
backbone is wrapped in DistributedDataParallel, only rank 0 writes, and the token mean is over the
kept tokens of all processes. Metrics are rank 0's own rollouts.

    opsd distill configs/tiny.yaml run.steps=5 loss.kind=forward_kl
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd import distributed
from opsd.checkpoint import checkpoint_or_stop, open_run_dir, restore, resume_point
from opsd.data import Fields, Problem, load_problems
from opsd.divergence import DivergenceKind, Estimator, chunked_divergence_to
from opsd.errors import UserError, require
from opsd.gating import Gating, gate
from opsd.grading import Grader
from opsd.metrics import MetricsLog
from opsd.memo import MEMO_INSTRUCTION, memo_teacher_message, write_memos
from opsd.models import Backbone, ModelConfig, causal_lm, check_fits, load_model, load_tokenizer, output_head
from opsd.purified import PurifiedTarget
from opsd.prompts import (CONCISE_INSTRUCTION, TeacherContext, check_template, reference_only_message, render_prompt,
                          teacher_user_message)
from opsd.rollout import SamplingConfig, check_sampling, collect_rollouts, grade_rollouts, has_answers, pack, response_hidden
from opsd.teacher import ExternalTeacher, TeacherWeightsConfig, TeacherWeightsState, teacher_hidden
from opsd.training import (OptimConfig, Timer, advance, autocast, check_optim, guarded_step,
                           load_policy, make_optimizer, new_progress, set_lr, step_items, step_seed)


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
    chunk_size: int = 256  # positions per chunk of the full-vocabulary divergence


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/distill"  # run folder: config.yaml, metrics.jsonl, checkpoints/
    overwrite: bool = False  # replace an existing run folder
    steps: int = 100  # optimizer steps
    problems_per_step: int = 32  # problems sampled per step (× sampling.n rollouts)
    save_every: int = 0  # checkpoint every k steps (0: only at the end)
    keep_last: int = 3  # checkpoints kept (the latest ones; 0 keeps all)
    resume: bool = False  # insist on continuing the run in output_dir (it continues anyway when there is one)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grader_timeout_s: float = 5.0  # per-answer limit of the math-verify worker
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed


@dataclass(frozen=True)
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    gating: Gating = "all"  # all | correct_only | incorrect_only | correct_and_truncated
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def check_options(config: DistillConfig, world: int = 1) -> None:
    """Out-of-range and contradictory options, refused before any work starts."""
    loss, optim, run, weights = config.loss, config.optim, config.run, config.teacher.weights
    require(
        ("loss.beta", 0.0 <= loss.beta <= 1.0, "in [0, 1]"),
        ("loss.temperature", loss.temperature > 0, "positive"),
        ("loss.top_k", loss.top_k >= 1, "at least 1"),
        ("loss.chunk_size", loss.chunk_size >= 1, "at least 1"),
        ("loss.clip_tau", loss.clip_tau is None or math.isfinite(loss.clip_tau), "a finite number or null"),
        ("teacher.weights.refresh_every", weights.refresh_every >= 1, "at least 1"),
        ("teacher.weights.ema_decay", 0.0 <= weights.ema_decay < 1.0, "in [0, 1)"),
        ("run.steps", run.steps >= 1, "at least 1"),
        ("run.problems_per_step", run.problems_per_step >= world, f"at least the number of processes ({world})"),
        ("run.save_every", run.save_every >= 0, "non-negative"),
        ("run.keep_last", run.keep_last >= 0, "non-negative"),
        ("run.grader_timeout_s", run.grader_timeout_s > 0, "positive"),
    )
    check_optim(optim)
    check_sampling(config.sampling, "sampling")
    if loss.estimator == "sampled" and loss.clip_tau is not None:
        raise UserError("loss.clip_tau applies to the full and topk estimators, not to loss.estimator=sampled")
    if loss.estimator == "sampled" and loss.kind != "reverse_kl":
        raise UserError("loss.estimator=sampled estimates the reverse KL only; set loss.kind=reverse_kl")
    if config.teacher.context == "template":
        check_template(config.teacher.template, "teacher.template")
    teacher = config.teacher
    require(
        ("teacher.memo_max_tokens", teacher.memo_max_tokens >= 1, "at least 1"),
        ("teacher.purified_clip", teacher.purified_clip > 0, "positive"),
        ("teacher.purified_beta", teacher.purified_beta > 0, "positive"),
    )
    if teacher.context == "purified" and teacher.weights.policy != "frozen":
        raise UserError("teacher.context=purified uses three frozen views; set teacher.weights.policy=frozen")
    if teacher.model is not None and teacher.weights.policy != "frozen":
        raise UserError("an external teacher (teacher.model) is frozen; set teacher.weights.policy=frozen")
    if teacher.model is not None and teacher.model.lora_rank > 0:
        raise UserError("teacher.model.lora_rank must be 0: the external teacher is not trained")
    if config.model.dtype in ("bfloat16", "float16") and config.model.lora_rank == 0:
        raise UserError(f"model.dtype={config.model.dtype} would train the weights in {config.model.dtype} without a "
                        "float32 master copy; use model.dtype=float32 (bf16 autocast stays on with optim.bf16) or LoRA")


def needs_answers(config: DistillConfig) -> bool:
    return config.gating != "all" or config.loss.kind == "branched" or config.teacher.context in ("answer", "memo")


def run_distill(config: DistillConfig) -> Path | None:
    """Train; return the run folder (None on ranks other than 0). Everything a user can get wrong is
    checked before the folder is created."""
    world = distributed.world_size()
    check_options(config, world)
    resume_from = resume_point(config)
    problems = load_problems(config.data.path, config.data.fields, require_answer=needs_answers(config))
    device = distributed.device(config.run.device)
    tokenizer = load_tokenizer(config.model)
    student_prompts = [render_prompt(tokenizer, p.problem) for p in problems]
    teacher_prompts = [
        render_prompt(tokenizer, teacher_user_message(p, config.teacher.context, config.teacher.template,
                                                      config.teacher.concise_instruction))
        for p in problems
    ]
    reference_prompts = [render_prompt(tokenizer, reference_only_message(p)) for p in problems] \
        if config.teacher.context == "purified" else None
    external = load_external_teacher(config.teacher, tokenizer, device) if config.teacher.model else None
    rank = distributed.setup(device)
    torch.manual_seed(config.run.seed + rank)
    model = load_policy(config.model, config.optim, device)
    check_same_vocabulary(model, external)
    memo = config.teacher.memo_max_tokens if config.teacher.context == "memo" else 0
    longest = max(len(p) for p in [*student_prompts, *teacher_prompts, *(reference_prompts or [])]) + memo
    check_fits(model, longest + config.sampling.max_new_tokens,
               f"the longest prompt ({longest} tokens) plus sampling.max_new_tokens ({config.sampling.max_new_tokens})")
    teacher = TeacherWeightsState(model, config.teacher.weights, uses_lora=config.model.lora_rank > 0)
    backbone = distributed.wrap(Backbone(model), device)
    optimizer = make_optimizer(model, config.optim)
    progress = restore(resume_from, model, optimizer, teacher) if resume_from else new_progress()
    run_dir = open_run_dir(config, rank, progress["step"])
    log = MetricsLog(run_dir, config.run.steps, config.run.tensorboard, done=progress["step"])
    generator = torch.Generator(device=device)
    with Grader(timeout_s=config.run.grader_timeout_s) as grader:
        for step in range(progress["step"] + 1, config.run.steps + 1):
            generator.manual_seed(step_seed(config.run.seed, rank, step))
            set_lr(optimizer, config.optim, step, config.run.steps)
            indices = step_items(len(problems), step, config.run.problems_per_step, config.data.shuffle, config.run.seed)
            indices = distributed.shard(indices, rank, world)
            prompts = StepPrompts([student_prompts[i] for i in indices], [teacher_prompts[i] for i in indices],
                                  [reference_prompts[i] for i in indices] if reference_prompts else None)
            metrics = train_step(config, model, backbone, teacher, external, optimizer, tokenizer, grader, generator,
                                 [problems[i] for i in indices], prompts, device)
            progress = advance(progress, step, metrics.pop("skipped"))
            teacher_changed = teacher.after_step(step)
            metrics.update({"optim/skipped_steps": progress["skipped"], "teacher/updated": teacher_changed})
            log.write(step, metrics, postfix={"div": metrics["loss/divergence"], "acc": metrics["rollout/accuracy"],
                                              "len": metrics["rollout/response_tokens_mean"]})
            checkpoint_or_stop(run_dir, config, model, tokenizer, optimizer, progress, "distill", teacher.state_dict())
    log.close()
    del backbone  # release the DDP reducer before the process group (see distributed.teardown)
    distributed.teardown()
    return run_dir


@dataclass(frozen=True)
class StepPrompts:
    """Token ids of a step's prompts, one per problem."""

    student: list[list[int]]
    teacher: list[list[int]]
    reference_only: list[list[int]] | None  # Purified OPSD's πR view


def train_step(
    config: DistillConfig, model, backbone, teacher: TeacherWeightsState, external: ExternalTeacher | None,
    optimizer, tokenizer, grader: Grader, generator: torch.Generator, problems: list[Problem],
    prompts: StepPrompts, device: torch.device,
) -> dict[str, float]:
    """One optimizer step (sample → grade → gate → teacher/student → backward → step); its metrics."""
    timer = Timer()
    started = time.perf_counter()
    model.eval()
    with timer("generate"):
        rollouts = collect_rollouts(model, prompts.student, config.sampling, tokenizer, generator)
    with timer("grade"):
        correct = grade_rollouts(rollouts, problems, tokenizer, grader)
    keep = gate(correct, [r.truncated for r in rollouts], config.gating)
    kept = [(r, c) for r, c, k in zip(rollouts, correct, keep) if k]
    with timer("memo"):
        teacher_prompts = rollout_teacher_prompts(config.teacher, model, tokenizer, kept, problems, prompts.teacher, generator)
    kept_tokens = sum(len(r.response_ids) for r, _ in kept)
    total_tokens = distributed.sum_over_ranks(kept_tokens)
    # token mean over the whole step: DDP averages gradients over processes, hence the factor world
    token_weight = distributed.world_size() / max(total_tokens, 1)

    optimizer.zero_grad(set_to_none=True)
    sums = collections.defaultdict(float)
    micro = config.optim.micro_batch_size
    n_micro = distributed.max_over_ranks(math.ceil(len(kept) / micro))
    for index in range(n_micro):
        batch = kept[index * micro : (index + 1) * micro]
        batch_teacher_prompts = teacher_prompts[index * micro : (index + 1) * micro]
        with distributed.no_sync_unless(backbone, last=index == n_micro - 1):
            if not batch:  # this process has run out: a zero-weight pass keeps DDP's collectives in step
                distributed.idle_backward(backbone, output_head(model), tokenizer.pad_token_id, device)
                continue
            responses = [r.response_ids for r, _ in batch]
            with timer("teacher"):
                target = teacher_target(config, model, teacher, external, batch, batch_teacher_prompts, prompts,
                                        tokenizer.pad_token_id, device)
            with timer("student"):
                model.train()
                packed_s = pack([prompts.student[r.problem_index] for r, _ in batch], responses, tokenizer.pad_token_id, device)
                with autocast(config.optim, device):
                    hidden_s = response_hidden(backbone, packed_s)
                reverse_N = torch.tensor([c for _, c in batch], device=device)[packed_s.row_N]
                result = chunked_divergence_to(
                    hidden_s, output_head(model), target,
                    torch.full_like(packed_s.targets_N, token_weight, dtype=torch.float32),
                    packed_s.targets_N, reverse_N if config.loss.kind == "branched" else None,
                    chunk_size=config.loss.chunk_size, kind=config.loss.kind, beta=config.loss.beta,
                    temperature=config.loss.temperature, clip_tau=config.loss.clip_tau,
                    estimator=config.loss.estimator, top_k=config.loss.top_k,
                )
                result.loss.backward()
            sums["divergence"] += float(result.value_N.sum())
            sums["entropy"] += float(result.entropy_N.sum())
            sums["clipped"] += float(result.clipped_N.float().sum())
            if isinstance(target, PurifiedTarget):
                sums["gap_cosine"] += float(torch.cat(target.cosines).sum())
                sums["gap_norm_ratio"] += float(torch.cat(target.norm_ratios).sum())

    grad_norm, skipped = guarded_step(model, optimizer, config.optim.max_grad_norm, has_gradient=total_tokens > 0)

    lengths = [len(r.response_ids) for r in rollouts]
    per_token = lambda key: sums[key] / kept_tokens if kept_tokens else float("nan")  # noqa: E731
    generate_s, student_s, teacher_s = timer.total("generate"), timer.total("student"), timer.total("teacher")
    return {
        "loss/divergence": per_token("divergence"),
        "loss/clipped_ratio": per_token("clipped"),
        "loss/student_entropy": per_token("entropy"),
        **({"purified/gap_cosine": per_token("gap_cosine"), "purified/gap_norm_ratio": per_token("gap_norm_ratio")}
           if config.teacher.context == "purified" else {}),
        "rollout/accuracy": sum(correct) / len(correct) if has_answers(problems) else float("nan"),
        "rollout/count": len(rollouts),
        "rollout/kept": len(kept),
        "rollout/response_tokens_mean": sum(lengths) / len(lengths),
        "rollout/response_tokens_max": max(lengths),
        "rollout/truncated_ratio": sum(r.truncated for r in rollouts) / len(rollouts),
        "optim/grad_norm": grad_norm,
        "optim/lr": optimizer.param_groups[0]["lr"],
        "optim/empty_step": total_tokens == 0,
        "time/generate_s": generate_s,
        "time/grade_s": timer.total("grade"),
        "time/memo_s": timer.total("memo"),
        "time/teacher_s": teacher_s,
        "time/student_s": student_s,
        "time/step_s": time.perf_counter() - started,
        "throughput/generate_tokens_per_s": sum(lengths) / generate_s if generate_s else float("nan"),
        "throughput/train_tokens_per_s": kept_tokens / (teacher_s + student_s) if kept_tokens else float("nan"),
        "skipped": skipped,
    }


def teacher_target(config: DistillConfig, model, teacher: TeacherWeightsState, external: ExternalTeacher | None,
                   batch, teacher_prompts: list[list[int]], prompts: StepPrompts, pad_id: int, device: torch.device):
    """The teacher of one micro-batch as a function from a slice of response positions to [C × V]
    logits: one view (its prompt ‖ the responses) projected by the teacher's head, or Purified OPSD's
    target from three views. Hidden states are computed here, once, without autograd."""
    responses = [r.response_ids for r, _ in batch]
    views = [teacher_prompts]
    if config.teacher.context == "purified":
        views += [[prompts.reference_only[r.problem_index] for r, _ in batch],
                  [prompts.student[r.problem_index] for r, _ in batch]]
    model.eval()
    with autocast(config.optim, device):
        hidden = [view_hidden(model, teacher, external, view, responses, pad_id, device) for view in views]
    head = external.head() if external is not None else teacher.head()
    if config.teacher.context == "purified":
        return PurifiedTarget(*hidden, head, config.teacher.purified_clip, config.teacher.purified_beta)
    return lambda part: hidden[0][part] @ head.T


def rollout_teacher_prompts(teacher: TeacherConfig, model, tokenizer, kept, problems: list[Problem],
                            per_problem: list[list[int]], generator) -> list[list[int]]:
    """The teacher prompt of each kept rollout: its problem's, or (context=memo) one holding the memo
    the model writes about this very attempt."""
    if teacher.context != "memo":
        return [per_problem[r.problem_index] for r, _ in kept]
    memos = write_memos(causal_lm(model), tokenizer, [r for r, _ in kept], [c for _, c in kept], problems,
                        teacher.memo_instruction, teacher.memo_max_tokens, 1.0, generator)
    return [render_prompt(tokenizer, memo_teacher_message(problems[r.problem_index], memo))
            for (r, _), memo in zip(kept, memos)]


def view_hidden(model, teacher: TeacherWeightsState, external: ExternalTeacher | None, prompts: list[list[int]],
                responses: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """[N × H] hidden states of one teacher view (prompts ‖ the student's responses), no autograd."""
    if external is not None:
        return external.hidden(pack(prompts, responses, pad_id, external.device))
    return teacher_hidden(model, pack(prompts, responses, pad_id, device), teacher)


def load_external_teacher(config: TeacherConfig, student_tokenizer, student_device: torch.device) -> ExternalTeacher:
    """The external teacher on its device, after checking it shares the student's tokenizer."""
    teacher_tokenizer = load_tokenizer(config.model)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(f"the teacher's vocabulary ({len(teacher_tokenizer)} tokens) differs from the student's "
                        f"({len(student_tokenizer)} tokens): on-policy distillation needs the same tokenizer")
    teacher_device = distributed.device(config.device) if config.device else student_device
    return ExternalTeacher(load_model(config.model, teacher_device), student_device)


def check_same_vocabulary(student, external: ExternalTeacher | None) -> None:
    if external is None:
        return
    rows_s, rows_t = output_head(student).shape[0], external.head().shape[0]
    if rows_s != rows_t:
        raise UserError(f"the teacher's output layer has {rows_t} rows and the student's {rows_s}: "
                        "the vocabularies differ")
