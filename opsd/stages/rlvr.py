"""`opsd rlvr`: reinforcement learning with a verifiable math reward, GRPO with DAPO's choices.

One step, top to bottom (METHODS.md §3, the RLVR stage of Kim & Lee; DAPO, Yu et al. 2025):
  1. sample G responses for each of P problems from the policy (prompts rendered with the `prompt` section:
     opsd/core/prompts.py);
  2. reward = the verdict of the problem's verifier (math: 1 if the final answer is correct, else 0), plus DAPO's soft
     overlong penalty when `overlong_buffer` > 0;
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd.core.data import Fields, load_problems
from opsd.core.errors import require
from opsd.core.models import ModelConfig, output_head
from opsd.core.packing import Packed, pack, response_hidden
from opsd.core.prompts import PromptConfig, render_prompt, with_instruction
from opsd.generation import SamplingConfig, check_sampling, request_seed
from opsd.generation.rollouts import (
    Rollout,
    collect_rollouts,
    pick,
    response_texts,
    rollout_rows,
)
from opsd.objectives.logprobs import chunked_token_logprobs, gap_tally, logprob_gap
from opsd.objectives.policy_loss import (
    clipped_policy_loss,
    group_advantages,
    informative_groups,
    kl_k3,
    overlong_penalty,
)
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
from opsd.teacher.weights import TeacherWeightsConfig
from opsd.verifiers import ANSWER_FREE, VerifierConfig, check_problems, check_verifier


@dataclass(frozen=True)
class RLVRDataConfig:
    path: str = "configs/examples/arithmetic.jsonl"  # JSONL/Parquet problems with gold answers
    fields: Fields = field(default_factory=Fields)  # column names for problem/answer/solution/id
    shuffle: bool = True  # reshuffle the problems every epoch
    instruction: str = ""  # the older spelling of prompt.instruction (text put before every problem)


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
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy to train (folder, hub name, builtin:tiny)
    data: RLVRDataConfig = field(default_factory=RLVRDataConfig)  # the problems with their answers
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=16))  # how rollouts are sampled
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # GRPO/DAPO's clip, group filter, overlong penalty and KL term
    samples_per_step: int = 4  # rollouts per step saved to samples.jsonl with reward and advantage (0: none)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # the reward: each row's verifier
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW, schedule, memory knobs
    prompt: PromptConfig = field(default_factory=PromptConfig)  # chat template options, system prompt, instruction
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rlvr"))  # the run contract


def check_options(config: RLVRConfig, world: int = 1) -> None:
    check_optim(config.optim)
    check_sampling(config.sampling, "sampling", config.run.device)
    check_run(config.run, world)
    check_verifier(config.verifier)
    prompt_options(config)
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


def prompt_options(config: RLVRConfig) -> PromptConfig:
    """The `prompt` section, with the instruction of the older key `data.instruction` when that is set."""
    return with_instruction(config.prompt, config.data.instruction, "data.instruction")


def run_rlvr(config: RLVRConfig, name: str = "rlvr", check_only: bool = False) -> Path | None:
    """Train; return the run folder (None on ranks other than 0). `name` labels the progress bar;
    `check_only` (`--check`): every check that needs no weights, then return None."""
    begun = begin(config, check_options)
    problems = load_problems(config.data.path, config.data.fields, require_answer=True,
                             default_verifier=config.verifier.default, answer_free=ANSWER_FREE)
    check_problems(problems, config.data.path, config.verifier)
    prompt = prompt_options(config)
    prompts = [render_prompt(begun.tokenizer, p.problem, prompt) for p in problems]
    positions = max(len(p) for p in prompts) + config.sampling.max_new_tokens
    what = (f"the longest prompt ({positions - config.sampling.max_new_tokens} tokens) plus sampling.max_new_tokens "
            f"({config.sampling.max_new_tokens})")
    reference = TeacherWeightsConfig("frozen") if config.grpo.kl_coef > 0 else None  # the k3 KL's initial policy
    needs = Needs(fits=((positions, what),), shadow=reference, sampling=config.sampling, engine_positions=positions,
                  engine_what=what, verifier=config.verifier, samples_per_step=config.samples_per_step)
    if check_only:
        return check(config, needs, checks=check_only)
    with session(config, name, "rlvr", begun, needs) as s:
        for step in s.steps():
            order = step_items(len(problems), step, config.run.problems_per_step, config.data.shuffle, config.run.seed)
            mine = s.my_share(order)  # this process's places in the step
            indices = [order[p] for p in mine]
            # by place: the same samples on any number of processes
            seeds = [request_seed(config.run.seed, step, p) for p in mine]
            result = rlvr_step(config, s, [problems[i] for i in indices], [prompts[i] for i in indices], seeds)
            s.end_step(step, result)
    return s.run_dir


@dataclass(frozen=True)
class Kept:
    """A rollout the group filter kept, with its group-normalised advantage."""

    rollout: Rollout
    advantage: float


def rlvr_step(config: RLVRConfig, s: Session, problems, prompts: list[list[int]], seeds: list[int]) -> StepResult:
    """Sample → reward → advantages → filter → old log-probs → clipped updates; metrics, samples.jsonl rows."""
    timer, started, grpo = Timer(), time.perf_counter(), config.grpo
    s.model.eval()
    with timer("generate"):
        s.engine.ready()  # every process: the trainer's weights into the engine if they changed
        with s.engine.decoding():
            rollouts = collect_rollouts(s.engine, prompts, config.sampling, seeds)
    s.engine.idle()  # vllm's sleep mode: its memory back while training runs
    with timer("grade"):
        verdicts = s.verifiers.verify(response_texts(s.tokenizer, rollouts),
                                      [problems[r.problem_index] for r in rollouts])
    lengths = torch.tensor([len(r.response_ids) for r in rollouts])
    rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32) + overlong_penalty(
        lengths, config.sampling.max_new_tokens, grpo.overlong_buffer)
    rewards_P_G = rewards.view(len(prompts), config.sampling.n)
    advantages = group_advantages(rewards_P_G, grpo.scale_by_std).flatten()
    keep_P = informative_groups(rewards_P_G) if grpo.filter_equal_groups else torch.ones(len(prompts), dtype=torch.bool)
    keep = keep_P.repeat_interleave(config.sampling.n).tolist()
    kept = [Kept(r, float(a)) for r, a, k in zip(rollouts, advantages, keep) if k]
    rows = sample_rows(s.tokenizer, s.samples.per_step, rollouts, problems, verdicts, rewards, advantages, keep)
    kept_tokens = sum(len(k.rollout.response_ids) for k in kept)
    total_tokens = distributed.sum_over_ranks(kept_tokens)
    positions = [len(k.rollout.prompt_ids) + len(k.rollout.response_ids) for k in kept]
    batches = s.cut_micro_batches(kept, positions)  # the training passes' micro-batches, in the same order
    with timer("old_logprobs"), torch.no_grad():  # FSDP: the weights whole for these forwards, no collective inside
        with distributed.gathered(s.backbone):
            olds = [old_logprobs(config, s, b) for b in batches]
        old, gaps = [logp for logp, _ in olds], [gap for _, gap in olds]
        ref = [None] * len(batches)
        if s.shadow is not None:
            with s.shadow.active(), distributed.gathered(s.backbone):
                ref = [policy_logprobs(config, s, b)[0].detach() for b in batches]
    sums: dict[str, float] = collections.defaultdict(float)
    grad_norm, skipped = float("nan"), False
    s.model.train()
    for _ in range(grpo.updates_per_step):
        with timer("train"):
            policy_gradient(config, s, kept, positions, old, ref, s.world / max(total_tokens, 1), sums)
        grad_norm, was_skipped = guarded_step(s.model, s.optimizer, config.optim.max_grad_norm,
                                              has_gradient=total_tokens > 0)
        skipped = skipped or was_skipped

    # every process's part of the step, reduced over the processes (runtime/metrics.py Tally)
    tally = Tally()
    tally.mean("reward/mean", float(rewards.sum()), len(rewards))
    tally.mean("rollout/accuracy", sum(v.correct for v in verdicts), len(verdicts))
    tally.sum("rollout/count", len(rollouts))
    tally.sum("rollout/restated", sum(v.restated for v in verdicts))
    tally.sum("rollout/kept", len(kept))
    tally.sum("rollout/kept_groups", int(keep_P.sum()))
    tally.mean("rollout/response_tokens_mean", int(lengths.sum()), len(lengths))
    tally.max("rollout/response_tokens_max", int(lengths.max()))
    tally.mean("rollout/truncated_ratio", sum(r.truncated for r in rollouts), len(rollouts))
    gap_tally(tally, sum(g for g, _ in gaps), sum(o for _, o in gaps), kept_tokens, True)
    updates = grpo.updates_per_step * kept_tokens  # the token mean of each update, over the updates
    tally.mean("policy/clipped_ratio", sums["clipped"], updates)
    tally.mean("policy/ratio_mean", sums["ratio"], updates)
    if s.shadow is not None:
        tally.mean("policy/kl", sums["kl"], updates)
    else:
        tally.same("policy/kl", float("nan"))
    tally.same("optim/grad_norm", grad_norm)
    tally.same("optim/lr", s.optimizer.param_groups[0]["lr"])
    tally.same("optim/empty_step", total_tokens == 0)
    tally.same("train/tokens", total_tokens)
    for phase in ("generate", "grade", "old_logprobs", "train"):
        tally.max(f"time/{phase}_s", timer.total(phase))
    tally.max("time/step_s", time.perf_counter() - started)
    tally.rate("throughput/generate_tokens_per_s", int(lengths.sum()), timer.total("generate"))
    metrics = tally.reduce()
    accuracy = metrics["rollout/accuracy"]
    why_empty = (f"the {config.sampling.n} samples of every problem earned equal rewards, so "
                 f"grpo.filter_equal_groups dropped them all; rollout accuracy {accuracy:.2f}")
    return StepResult(metrics, skipped, total_tokens, rows=rows, why_empty=why_empty,
                      postfix={"reward": metrics["reward/mean"], "acc": accuracy,
                               "len": metrics["rollout/response_tokens_mean"]})


def sample_rows(tokenizer, wanted: int, rollouts: list[Rollout], problems, verdicts, rewards: torch.Tensor,
                advantages: torch.Tensor, keep: list[bool]) -> list[dict]:
    """samples.jsonl rows of `wanted` of the step's rollouts: what every stage saves, the reward (with
    the overlong penalty), the group-normalised advantage and whether the group filter kept it."""
    picked = pick(len(rollouts), wanted)
    rows = rollout_rows(tokenizer, rollouts, problems, verdicts, picked)
    for row, index in zip(rows, picked):
        row.update({"reward": float(rewards[index]), "advantage": float(advantages[index]), "kept": keep[index]})
    return rows


def policy_gradient(config: RLVRConfig, s: Session, kept: list[Kept], positions: list[int],
                    old: list[torch.Tensor], ref: list, token_weight: float, sums: dict[str, float]) -> None:
    """One pass over the kept rollouts (of `positions` prompt + response each) in micro-batches: the clipped surrogate
    (+ k3 KL), backward; gradients accumulate for one optimizer update. `old` and `ref` hold one entry per
    micro-batch, cut the same way (`Session.cut_micro_batches`)."""
    grpo = config.grpo
    for index, batch in enumerate(s.micro_batches(kept, positions)):
        if not batch:  # this process has run out: keep the collectives in step
            s.idle_pass()
            continue
        logp_N, packed = policy_logprobs(config, s, batch)
        advantage_N = torch.tensor([k.advantage for k in batch], device=s.device)[packed.row_N]
        loss_N, clipped_N = clipped_policy_loss(logp_N, old[index], advantage_N, grpo.eps_low, grpo.eps_high)
        if ref[index] is not None:
            kl_N = kl_k3(logp_N, ref[index])
            loss_N = loss_N + grpo.kl_coef * kl_N
            sums["kl"] += float(kl_N.detach().sum())
        (loss_N.sum() * token_weight).backward()
        sums["clipped"] += float(clipped_N.float().sum())
        sums["ratio"] += float(torch.exp(logp_N.detach() - old[index]).sum())


def policy_logprobs(config: RLVRConfig, s: Session, batch: list[Kept]) -> tuple[torch.Tensor, Packed]:
    """[N] log-probabilities of the batch's response tokens at the sampling temperature under the
    network's weights as they are (the KL reference's inside `s.shadow.active()`), and the packed batch."""
    packed = pack([k.rollout.prompt_ids for k in batch], [k.rollout.response_ids for k in batch],
                  s.tokenizer.pad_token_id, s.device, flat=config.optim.micro_batch_tokens > 0)
    with autocast(config.optim, s.device):
        hidden_N_H = response_hidden(s.backbone, packed)
    head = output_head(s.model)  # read after the forward (whole under FSDP); the reference's inside its block
    logp_N = chunked_token_logprobs(hidden_N_H, head, packed.targets_N, config.sampling.temperature,
                                    config.optim.chunk_size)
    return logp_N, packed


def old_logprobs(config: RLVRConfig, s: Session, batch: list[Kept]) -> tuple[torch.Tensor, tuple[float, int]]:
    """The sampling policy's own [N] log-probabilities of the batch (no autograd), and the engine's
    log-prob gap summed over its tokens from the same forward (see `logprobs.logprob_gap`)."""
    packed = pack([k.rollout.prompt_ids for k in batch], [k.rollout.response_ids for k in batch],
                  s.tokenizer.pad_token_id, s.device, flat=config.optim.micro_batch_tokens > 0)
    with autocast(config.optim, s.device):
        hidden_N_H = response_hidden(s.backbone, packed)
    head = output_head(s.model)
    logp_N = chunked_token_logprobs(hidden_N_H, head, packed.targets_N, config.sampling.temperature,
                                    config.optim.chunk_size)
    gap = logprob_gap(hidden_N_H, head, packed.targets_N, [k.rollout.sample_logprobs for k in batch],
                      config.sampling, config.optim.chunk_size, trainer_N=logp_N)
    return logp_N.detach(), gap
