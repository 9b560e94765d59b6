"""`opsd sft`: supervised fine-tuning on (problem, response) pairs, the loss on response tokens only.

The first stage of SFT → RLVR → OPSD (METHODS.md §3, §5). Each pair is rendered with the model's chat
template and the `prompt` section (opsd/core/prompts.py: system prompt, instruction, template options such as
{enable_thinking: false}) (user turn: the problem; assistant turn: the response, then EOS). The loss is the token mean
of −log p(response token) over the step's response tokens, computed in chunks of positions from the
final hidden states (opsd/objectives/logprobs.py). A step's sequences are sorted by length before they are cut
into micro-batches, so padding stays small; `data.padding_free=true` instead lays each micro-batch's
sequences back to back in one row (position ids restarting at each, attention kept inside each
sequence), which pays with flash-attention; `optim.micro_batch_tokens` does so too, with micro-batches
cut by a token budget rather than a count of sequences.

    opsd sft configs/sft.yaml data.path=pairs.jsonl model.name_or_path=MODEL
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from opsd.core.data import load_pairs
from opsd.core.errors import require
from opsd.core.models import ModelConfig, output_head
from opsd.core.packing import pack, response_hidden
from opsd.core.prompts import PLAIN, PromptConfig, render_prompt
from opsd.objectives.logprobs import chunked_token_logprobs
from opsd.runtime import distributed
from opsd.runtime.metrics import Tally
from opsd.runtime.runs import RunConfig, check_run
from opsd.runtime.training import (
    OptimConfig,
    autocast,
    check_optim,
    guarded_step,
    step_items,
)
from opsd.stages.session import Needs, StepResult, begin, check, session


@dataclass(frozen=True)
class SFTDataConfig:
    path: str = ""  # JSONL/Parquet file with a problem and a response per row
    problem_field: str = "problem"  # column of the user turn
    response_field: str = "response"  # column of the assistant turn (the training target)
    shuffle: bool = True  # reshuffle every epoch
    max_length: int = 2048  # tokens per sequence (prompt + response); longer responses are cut
    padding_free: bool = False  # one row per micro-batch, sequences back to back; pays only with an
    #   attention that skips the masked blocks (model.attn_implementation=flash_attention_2): with sdpa
    #   or eager the block-diagonal mask is dense and attention cost grows with the row's length squared


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the model to fine-tune (folder, hub name, builtin:tiny)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)  # the problem/response pairs
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, micro_batch_size=16))  # AdamW, memory knobs
    prompt: PromptConfig = field(default_factory=PromptConfig)  # chat template options, system prompt, instruction
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/sft", steps=1000))  # the run contract


def check_options(config: SFTConfig, world: int = 1) -> None:
    check_optim(config.optim)
    check_run(config.run, world)
    require(
        ("data.path", bool(config.data.path), "set to a JSONL/Parquet file of problem/response pairs"),
        ("data.max_length", config.data.max_length >= 2, "at least 2"),
    )


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, max_length: int,
                   prompt_options: PromptConfig = PLAIN) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt ids, response ids + EOS) per pair, cut to max_length; and how many were cut."""
    examples, cut = [], 0
    for problem, response in pairs:
        prompt = render_prompt(tokenizer, problem, prompt_options)
        target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_length - len(prompt)
        if room < len(target):
            cut += 1
            target = target[: max(room, 1)]
        examples.append((prompt, target))
    return examples, cut


def run_sft(config: SFTConfig, name: str = "sft", check_only: bool = False) -> Path | None:
    """Train; return the run folder (None on ranks other than 0). `name` labels the progress bar;
    `check_only` (`--check`): every check that needs no weights, then return None."""
    begun = begin(config, check_options)
    pairs = load_pairs(config.data.path, config.data.problem_field, config.data.response_field)
    examples, cut = tokenize_pairs(pairs, begun.tokenizer, config.data.max_length, config.prompt)
    longest = max(len(p) + len(t) for p, t in examples)
    needs = Needs(fits=((longest, "the longest problem and response (after "
                                  f"data.max_length={config.data.max_length})"),))
    if check_only:
        return check(config, needs, checks=check_only)
    with session(config, name, "sft", begun, needs) as s:
        s.model.train()
        for step in s.steps():
            started = time.perf_counter()
            indices = step_items(len(examples), step, config.run.problems_per_step, config.data.shuffle,
                                 config.run.seed)
            batch = sorted((examples[i] for i in distributed.shard(indices, s.rank, s.world)),
                           key=lambda e: len(e[0]) + len(e[1]))
            tokens = sum(len(target) for _, target in batch)
            total_tokens = distributed.sum_over_ranks(tokens)
            loss_sum = 0.0
            for part in s.micro_batches(batch, [len(p) + len(t) for p, t in batch]):
                if not part:  # this process has run out: a zero-weight pass keeps the collectives in step
                    s.idle_pass()
                    continue
                packed = pack([p for p, _ in part], [t for _, t in part], s.tokenizer.pad_token_id, s.device,
                              flat=config.data.padding_free or config.optim.micro_batch_tokens > 0)
                with autocast(config.optim, s.device):
                    hidden_N_H = response_hidden(s.backbone, packed)
                logp_N = chunked_token_logprobs(hidden_N_H, output_head(s.model), packed.targets_N,
                                                chunk_size=config.optim.chunk_size)
                # token mean over the whole step (DDP and FSDP average over processes, hence the factor world)
                (-logp_N.sum() * (s.world / total_tokens)).backward()
                loss_sum -= float(logp_N.detach().sum())
            grad_norm, skipped = guarded_step(s.model, s.optimizer, config.optim.max_grad_norm)
            seconds = time.perf_counter() - started
            tally = Tally()  # every process's part of the step, reduced over the processes
            tally.mean("loss/nll", loss_sum, tokens)
            tally.same("optim/grad_norm", grad_norm)
            tally.same("optim/lr", s.optimizer.param_groups[0]["lr"])
            tally.same("data/cut_sequences", cut)
            tally.rate("throughput/tokens_per_s", tokens, seconds)
            tally.max("time/step_s", seconds)
            metrics = tally.reduce()
            s.end_step(step, StepResult(metrics, skipped, total_tokens, postfix={"nll": metrics["loss/nll"]}))
    return s.run_dir
