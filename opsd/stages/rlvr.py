"""`opsd rlvr`: reinforcement learning with a verifiable math reward, GRPO with DAPO's choices.

One step, top to bottom (METHODS.md §3, the RLVR stage of Kim & Lee; DAPO, Yu et al. 2025):
  1. sample G responses for each of P problems from the policy;
  2. reward = the verdict of the problem's verifier (math: 1 if the final answer is correct, else 0), plus DAPO's soft overlong
     penalty when `overlong_buffer` > 0;
  3. group-normalised advantages (r − mean)/std per problem; groups whose rewards are all equal carry
     no signal and are dropped (DAPO's dynamic-sampling filter, without re-sampling);
  4. old log-probabilities of the kept responses with the sampling policy's weights (no autograd);
  5. `updates_per_step` passes over the kept rollouts in micro-batches: token-mean over the step of
     −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (+ kl_coef · k3-KL to the initial policy when asked);
     log-probabilities at the sampling temperature, in chunks from final hidden states;
  6. clip the gradient norm, skip a non-finite step, AdamW; metrics, `samples_per_step` rollouts with
     their reward and advantage (samples.jsonl); checkpoints.

Deviations: no re-sampling to refill filtered groups (the step just trains on fewer rollouts); the
old log-probabilities are recomputed with a forward pass rather than taken from the sampler, so they
use exactly the training computation (the sampler's top-p/top-k filtering is not part of them).

    opsd rlvr configs/rlvr-tiny.yaml model.name_or_path=runs/sft/checkpoints/step_001000
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd.runtime import distributed
from opsd.runtime.checkpoint import checkpoint_or_stop, restore, start_model
from opsd.core.config import to_dict
from opsd.core.data import Fields, load_problems
from opsd.core.errors import require
from opsd.generation import (Engine, SamplingConfig, check_engine_fits, check_sampling, closing_on_error,
                             make_engine, request_seed)
from opsd.objectives.logprobs import chunked_token_logprobs, gap_metrics, logprob_gap
from opsd.runtime.metrics import MetricsLog
from opsd.core.models import ModelConfig, check_fits, load_tokenizer, output_head
from opsd.core.packing import pack, response_hidden
from opsd.objectives.policy_loss import clipped_policy_loss, group_advantages, informative_groups, kl_k3, overlong_penalty
from opsd.core.prompts import render_prompt
from opsd.generation.rollouts import Rollout, collect_rollouts, grade_rollouts
from opsd.runtime.runs import RunConfig, check_run, open_run_dir, resume_point, use_threads
from opsd.runtime.samples import SamplesLog, pick, rollout_rows
from opsd.teacher.target import TeacherWeightsConfig, TeacherWeightsState, start_snapshot
from opsd.runtime.training import (OptimConfig, Timer, advance, autocast, check_optim, compute_dtype, guarded_step,
                           load_policy, make_optimizer, new_progress, set_lr, stage_summary, step_items, wrap_policy)
from opsd.verifiers import VerifierConfig, Verifiers, check_problems, check_verifier


@dataclass(frozen=True)
class RLVRDataConfig:
    path: str = "configs/examples/arithmetic.jsonl"  # JSONL/Parquet problems with gold answers
    fields: Fields = field(default_factory=Fields)  # column names for problem/answer/solution/id
    shuffle: bool = True  # reshuffle the problems every epoch
    instruction: str = ""  # text put before every problem in the prompt (empty: the bare problem)


@dataclass(frozen=True)
class GRPOConfig:
    eps_low: float = 0.2  # lower clip of the importance ratio (DAPO)
    eps_high: float = 0.28  # upper clip (DAPO's clip-higher)
    scale_by_std: bool = True  # divide advantages by the group's std (GRPO); false: mean-centred only
    filter_equal_groups: bool = True  # drop groups whose rewards are all equal (DAPO)
    overlong_buffer: int = 0  # DAPO's soft overlong penalty over the last k tokens of the budget (0: off)
    kl_coef: float = 0.0  # weight of the k3 KL to the initial policy (DAPO: 0)
    updates_per_step: int = 1  # optimizer updates per batch of rollouts (> 1: ratios move off 1)


@dataclass(frozen=True)
class RLVRConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLVRDataConfig = field(default_factory=RLVRDataConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=16))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    samples_per_step: int = 4  # rollouts per step saved to samples.jsonl with reward and advantage (0: none)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # the reward: each row's verifier
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rlvr"))


def check_options(config: RLVRConfig, world: int = 1) -> None:
    check_optim(config.optim)
    check_sampling(config.sampling, "sampling", config.run.device)
    check_run(config.run, world)
    check_verifier(config.verifier)
    grpo = config.grpo
    require(
        ("sampling.n", config.sampling.n >= 2, "at least 2 (advantages compare samples of one problem)"),
        ("sampling.temperature", config.sampling.temperature > 0, "positive (log-probabilities are taken at it)"),
        ("grpo.eps_low", 0 <= grpo.eps_low < 1, "in [0, 1)"),
        ("grpo.eps_high", grpo.eps_high >= 0, "non-negative"),
        ("grpo.overlong_buffer", 0 <= grpo.overlong_buffer <= config.sampling.max_new_tokens,
         "between 0 and sampling.max_new_tokens"),
        ("grpo.kl_coef", grpo.kl_coef >= 0, "non-negative"),
        ("grpo.updates_per_step", grpo.updates_per_step >= 1, "at least 1"),
        ("samples_per_step", config.samples_per_step >= 0, "non-negative (0: no samples.jsonl)"),
    )


def run_rlvr(config: RLVRConfig, name: str = "rlvr") -> Path | None:
    """Train; return the run folder (None on ranks other than 0). `name` labels the progress bar."""
    world = distributed.world_size()
    check_options(config, world)
    use_threads(config.run.threads)
    resume_from = resume_point(config.run, to_dict(config), type(config))
    problems = load_problems(config.data.path, config.data.fields, require_answer=True,
                             default_verifier=config.verifier.default)
    check_problems(problems, config.data.path, config.verifier)
    device = distributed.device(config.run.device)
    tokenizer = load_tokenizer(config.model)
    prefix = f"{config.data.instruction}\n\n" if config.data.instruction else ""
    prompts = [render_prompt(tokenizer, prefix + p.problem) for p in problems]
    rank = distributed.setup(device, cpu_collectives=config.run.fsdp_offload)
    torch.manual_seed(config.run.seed)  # the same on every process: FSDP shards each one's own LoRA initialisation
    model = load_policy(config.model, config.optim, device)
    longest = max(len(p) for p in prompts)
    positions = longest + config.sampling.max_new_tokens
    what = f"the longest prompt ({longest} tokens) plus sampling.max_new_tokens ({config.sampling.max_new_tokens})"
    check_fits(model, positions, what)
    check_engine_fits(config.sampling, "sampling", positions, what)
    frozen, uses_lora = TeacherWeightsConfig("frozen"), config.model.lora_rank > 0
    start = start_model(config.model, model,
                        start_snapshot(model, frozen, uses_lora) if config.grpo.kl_coef > 0 else None)
    backbone = wrap_policy(model, device, config.run.parallel, config.run.fsdp_offload, config.optim)
    reference = TeacherWeightsState(model, frozen, uses_lora=uses_lora) if config.grpo.kl_coef > 0 else None
    optimizer = make_optimizer(model, config.optim)
    progress = restore(resume_from, model, optimizer, start, reference) if resume_from else new_progress()
    # before the run folder: vLLM refuses a model it cannot serve here
    engine = make_engine(model, tokenizer, config.sampling, device, compute_dtype(config.optim, device),
                         lambda: distributed.gathered(backbone), positions)
    run_dir = closing_on_error(engine, lambda: open_run_dir(config.run, to_dict(config), rank, progress["step"]))
    with engine, Verifiers(config.verifier) as verifiers, \
            SamplesLog(run_dir, config.samples_per_step, resumed_step=progress["step"]) as samples, \
            MetricsLog(run_dir, config.run.steps, config.run.report_to, done=progress["step"], name=name,
                       config=to_dict(config)) as log:
        parts = Parts(model, backbone, optimizer, engine, reference, tokenizer,
                      verifiers, device)
        for step in range(progress["step"] + 1, config.run.steps + 1):
            set_lr(optimizer, config.optim, step, config.run.steps)
            order = step_items(len(problems), step, config.run.problems_per_step, config.data.shuffle, config.run.seed)
            positions = distributed.shard(list(range(len(order))), rank, world)  # this process's share of the step
            indices = [order[p] for p in positions]
            metrics, rows = rlvr_step(config, parts, [problems[i] for i in indices], [prompts[i] for i in indices],
                                      [request_seed(config.run.seed, step, p) for p in positions], samples.per_step)
            progress = advance(progress, step, metrics.pop("skipped"), metrics["train/tokens"])
            parts.engine.update_weights()
            metrics["optim/skipped_steps"] = progress["skipped"]
            samples.write(step, rows)
            log.write(step, metrics, postfix={"reward": metrics["reward/mean"], "acc": metrics["rollout/accuracy"],
                                              "len": metrics["rollout/response_tokens_mean"]})
            why_empty = (f"the {config.sampling.n} samples of every problem earned equal rewards, so "
                         f"grpo.filter_equal_groups dropped them all; rollout accuracy {metrics['rollout/accuracy']:.2f}")
            if metrics["optim/empty_step"] and progress["empty"] == 1:
                log.say(f"opsd: warning: step {step} had nothing to train on ({why_empty})")
            checkpoint_or_stop(run_dir, config.run, config.optim.max_skipped_in_a_row, model, tokenizer, optimizer,
                               progress, "rlvr", start, why_empty=why_empty)
        del parts, backbone  # release DDP's reducer / FSDP's state before the process group (see distributed.teardown)
    if run_dir is not None:
        print(stage_summary("rlvr", progress), file=sys.stderr)
    distributed.teardown()
    return run_dir


@dataclass(frozen=True)
class Parts:
    """What a step works with (built once by `run_rlvr`)."""

    model: torch.nn.Module  # the policy (PEFT-wrapped with LoRA)
    backbone: torch.nn.Module  # its final hidden states, wrapped by run.parallel under torchrun
    optimizer: torch.optim.Optimizer
    engine: Engine
    reference: TeacherWeightsState | None  # the initial policy's weights, for the k3 KL (kl_coef > 0)
    tokenizer: object
    verifiers: Verifiers
    device: torch.device


def rlvr_step(config: RLVRConfig, parts: Parts, problems, prompts: list[list[int]], seeds: list[int],
              samples_wanted: int) -> tuple[dict[str, float], list[dict]]:
    """Sample → reward → advantages → filter → old log-probs → clipped updates; metrics, samples.jsonl rows."""
    timer, started, grpo = Timer(), time.perf_counter(), config.grpo
    parts.model.eval()
    with timer("generate"):
        parts.engine.ready()  # every process: the trainer's weights into the engine if they changed
        # FSDP: the hf engine decodes with the trainer's module, whole for the block; vllm with its own copy
        with distributed.gathered(parts.backbone) if parts.engine.reads_trainer_module else contextlib.nullcontext():
            rollouts = collect_rollouts(parts.engine, prompts, config.sampling, seeds)
    parts.engine.idle()  # vllm's sleep mode: its memory back while training runs
    with timer("grade"):
        verdicts = grade_rollouts(rollouts, problems, parts.tokenizer, parts.verifiers)
    lengths = torch.tensor([len(r.response_ids) for r in rollouts])
    rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32) + overlong_penalty(
        lengths, config.sampling.max_new_tokens, grpo.overlong_buffer)
    rewards_P_G = rewards.view(len(prompts), config.sampling.n)
    advantages = group_advantages(rewards_P_G, grpo.scale_by_std).flatten()
    keep_P = informative_groups(rewards_P_G) if grpo.filter_equal_groups else torch.ones(len(prompts), dtype=torch.bool)
    keep = keep_P.repeat_interleave(config.sampling.n).tolist()
    kept = [(r, float(a)) for r, a, k in zip(rollouts, advantages, keep) if k]
    rows = sample_rows(parts.tokenizer, samples_wanted, rollouts, problems, verdicts, rewards, advantages, keep)
    kept_tokens = sum(len(r.response_ids) for r, _ in kept)
    total_tokens = distributed.sum_over_ranks(kept_tokens)
    micro = config.optim.micro_batch_size
    batches = [kept[i : i + micro] for i in range(0, len(kept), micro)]
    with timer("old_logprobs"), torch.no_grad():  # FSDP: the weights whole for these forwards, no collective inside
        with distributed.gathered(parts.backbone):
            pairs = [policy_logprobs(config, parts, b, with_gap=True) for b in batches]
        old, gaps = [logp for logp, _ in pairs], [gap for _, gap in pairs]
        ref = [None] * len(batches)
        if parts.reference is not None:
            with parts.reference.active(), distributed.gathered(parts.backbone):
                ref = [policy_logprobs(config, parts, b) for b in batches]
    sums: dict[str, float] = collections.defaultdict(float)
    grad_norm, skipped = float("nan"), False
    parts.model.train()
    for _ in range(grpo.updates_per_step):
        with timer("train"):
            policy_gradient(config, parts, batches, old, ref, distributed.world_size() / max(total_tokens, 1), sums)
        grad_norm, was_skipped = guarded_step(parts.model, parts.optimizer, config.optim.max_grad_norm,
                                              has_gradient=total_tokens > 0)
        skipped = skipped or was_skipped

    updates = grpo.updates_per_step * max(kept_tokens, 1)
    per_update = lambda key: sums[key] / updates if kept_tokens else float("nan")  # noqa: E731
    generate_s = timer.total("generate")
    return {
        "reward/mean": float(rewards.mean()),
        "rollout/accuracy": sum(v.correct for v in verdicts) / len(verdicts),
        "rollout/count": len(rollouts),
        "rollout/restated": sum(v.restated for v in verdicts),
        "rollout/kept": len(kept),
        "rollout/kept_groups": int(keep_P.sum()),
        "rollout/response_tokens_mean": float(lengths.float().mean()),
        "rollout/response_tokens_max": int(lengths.max()),
        "rollout/truncated_ratio": sum(r.truncated for r in rollouts) / len(rollouts),
        **gap_metrics(sum(g for g, _ in gaps), sum(o for _, o in gaps), kept_tokens, True),
        "policy/clipped_ratio": per_update("clipped"),
        "policy/ratio_mean": per_update("ratio"),
        "policy/kl": per_update("kl") if parts.reference is not None else float("nan"),
        "optim/grad_norm": grad_norm,
        "optim/lr": parts.optimizer.param_groups[0]["lr"],
        "optim/empty_step": total_tokens == 0,
        "train/tokens": total_tokens,
        **{f"time/{phase}_s": timer.total(phase) for phase in ("generate", "grade", "old_logprobs", "train")},
        "time/step_s": time.perf_counter() - started,
        "throughput/generate_tokens_per_s": float(lengths.sum()) / generate_s if generate_s else float("nan"),
        "skipped": skipped,
    }, rows


def sample_rows(tokenizer, wanted: int, rollouts: list[Rollout], problems, verdicts, rewards: torch.Tensor,
                advantages: torch.Tensor, keep: list[bool]) -> list[dict]:
    """samples.jsonl rows of `wanted` of the step's rollouts: what every stage saves, the reward (with
    the overlong penalty), the group-normalised advantage and whether the group filter kept it."""
    picked = pick(len(rollouts), wanted)
    rows = rollout_rows(tokenizer, rollouts, problems, verdicts, picked)
    for row, index in zip(rows, picked):
        row.update({"reward": float(rewards[index]), "advantage": float(advantages[index]), "kept": keep[index]})
    return rows


def policy_gradient(config: RLVRConfig, parts: Parts, batches, old: list[torch.Tensor], ref: list,
                    token_weight: float, sums: dict[str, float]) -> None:
    """One pass over the kept rollouts in micro-batches: the clipped surrogate (+ k3 KL), backward;
    gradients accumulate for one optimizer update."""
    grpo, device = config.grpo, parts.device
    n_micro = distributed.max_over_ranks(len(batches))
    for index in range(n_micro):
        with distributed.no_sync_unless(parts.backbone, last=index == n_micro - 1):
            if index >= len(batches):  # this process has run out: keep the collectives in step
                distributed.idle_backward(parts.backbone, parts.model, parts.tokenizer.pad_token_id, device)
                continue
            batch = batches[index]
            logp_N, packed = policy_logprobs(config, parts, batch, with_packed=True)
            advantage_N = torch.tensor([a for _, a in batch], device=device)[packed.row_N]
            loss_N, clipped_N = clipped_policy_loss(logp_N, old[index], advantage_N, grpo.eps_low, grpo.eps_high)
            if ref[index] is not None:
                kl_N = kl_k3(logp_N, ref[index])
                loss_N = loss_N + grpo.kl_coef * kl_N
                sums["kl"] += float(kl_N.detach().sum())
            (loss_N.sum() * token_weight).backward()
            sums["clipped"] += float(clipped_N.float().sum())
            sums["ratio"] += float(torch.exp(logp_N.detach() - old[index]).sum())


def policy_logprobs(config: RLVRConfig, parts: Parts, batch: list[tuple[Rollout, float]], with_packed: bool = False,
                    with_gap: bool = False):
    """[N] log-probabilities of the batch's response tokens at the sampling temperature under the
    network's weights as they are (the KL reference's inside `parts.reference.active()`); with the
    packed batch (`with_packed`), or with the engine's log-prob gap summed over the tokens (`with_gap`:
    the sampling policy's own forward, see `logprobs.logprob_gap`)."""
    packed = pack([r.prompt_ids for r, _ in batch], [r.response_ids for r, _ in batch], parts.tokenizer.pad_token_id,
                  parts.device)
    with autocast(config.optim, parts.device):
        hidden_N_H = response_hidden(parts.backbone, packed)
    head = output_head(parts.model)  # read after the forward (whole under FSDP); the reference's inside its block
    logp_N = chunked_token_logprobs(hidden_N_H, head, packed.targets_N, config.sampling.temperature, config.optim.chunk_size)
    if with_gap:
        return logp_N.detach(), logprob_gap(hidden_N_H, head, packed.targets_N, [r.sample_logprobs for r, _ in batch],
                                            config.sampling, config.optim.chunk_size, trainer_N=logp_N)
    return (logp_N, packed) if with_packed else logp_N.detach()
