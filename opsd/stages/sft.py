"""`opsd sft`: supervised fine-tuning on (problem, response) pairs, the loss on response tokens only.

The first stage of SFT → RLVR → OPSD (METHODS.md §3, §5). Each pair is rendered with the model's chat
template (user turn: the problem; assistant turn: the response, then EOS). The loss is the token mean
of −log p(response token) over the step's response tokens, computed in chunks of positions from the
final hidden states (opsd/objectives/logprobs.py). A step's sequences are sorted by length before they are cut
into micro-batches, so padding stays small; `data.padding_free=true` instead lays each micro-batch's
sequences back to back in one row (position ids restarting at each, attention kept inside each
sequence), which pays with flash-attention.

    opsd sft configs/sft.yaml data.path=pairs.jsonl model.name_or_path=MODEL
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd.runtime import distributed
from opsd.runtime.checkpoint import checkpoint_or_stop, restore, start_model
from opsd.core.config import to_dict
from opsd.core.data import load_pairs
from opsd.core.errors import require
from opsd.objectives.logprobs import chunked_token_logprobs
from opsd.runtime.metrics import MetricsLog
from opsd.core.models import ModelConfig, check_fits, load_tokenizer, output_head
from opsd.core.packing import pack, response_hidden
from opsd.core.prompts import render_prompt
from opsd.runtime.runs import RunConfig, check_run, open_run_dir, resume_point, use_threads
from opsd.runtime.training import (OptimConfig, advance, autocast, check_optim, guarded_step, load_policy,
                           make_optimizer, new_progress, set_lr, stage_summary, step_items, wrap_policy)


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
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, micro_batch_size=16))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/sft", steps=1000))


def check_options(config: SFTConfig, world: int = 1) -> None:
    check_optim(config.optim)
    check_run(config.run, world)
    require(
        ("data.path", bool(config.data.path), "set to a JSONL/Parquet file of problem/response pairs"),
        ("data.max_length", config.data.max_length >= 2, "at least 2"),
    )


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt ids, response ids + EOS) per pair, cut to max_length; and how many were cut."""
    examples, cut = [], 0
    for problem, response in pairs:
        prompt = render_prompt(tokenizer, problem)
        target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_length - len(prompt)
        if room < len(target):
            cut += 1
            target = target[: max(room, 1)]
        examples.append((prompt, target))
    return examples, cut


def run_sft(config: SFTConfig, name: str = "sft") -> Path | None:
    """Train; return the run folder (None on ranks other than 0). `name` labels the progress bar."""
    world = distributed.world_size()
    check_options(config, world)
    use_threads(config.run.threads)
    resume_from = resume_point(config.run, to_dict(config), type(config))
    pairs = load_pairs(config.data.path, config.data.problem_field, config.data.response_field)
    device = distributed.device(config.run.device)
    tokenizer = load_tokenizer(config.model)
    examples, cut = tokenize_pairs(pairs, tokenizer, config.data.max_length)
    rank = distributed.setup(device, cpu_collectives=config.run.fsdp_offload)
    torch.manual_seed(config.run.seed)  # the same on every process: FSDP shards each one's own LoRA initialisation
    model = load_policy(config.model, config.optim, device)
    longest = max(len(p) + len(t) for p, t in examples)
    check_fits(model, longest, f"the longest problem and response (after data.max_length={config.data.max_length})")
    start = start_model(config.model, model)
    backbone = wrap_policy(model, device, config.run.parallel, config.run.fsdp_offload, config.optim)
    optimizer = make_optimizer(model, config.optim)
    progress = restore(resume_from, model, optimizer, start) if resume_from else new_progress()
    run_dir = open_run_dir(config.run, to_dict(config), rank, progress["step"])
    with MetricsLog(run_dir, config.run.steps, config.run.report_to, done=progress["step"], name=name,
                       config=to_dict(config)) as log:
        model.train()
        for step in range(progress["step"] + 1, config.run.steps + 1):
            started = time.perf_counter()
            set_lr(optimizer, config.optim, step, config.run.steps)
            indices = step_items(len(examples), step, config.run.problems_per_step, config.data.shuffle, config.run.seed)
            batch = sorted((examples[i] for i in distributed.shard(indices, rank, world)), key=lambda e: len(e[0]) + len(e[1]))
            tokens = sum(len(target) for _, target in batch)
            total_tokens = distributed.sum_over_ranks(tokens)
            loss_sum = 0.0
            micro = config.optim.micro_batch_size
            n_micro = distributed.max_over_ranks(math.ceil(len(batch) / micro))
            for index in range(n_micro):
                part = batch[index * micro : (index + 1) * micro]
                with distributed.no_sync_unless(backbone, last=index == n_micro - 1):
                    if not part:  # this process has run out: a zero-weight pass keeps the collectives in step
                        distributed.idle_backward(backbone, model, tokenizer.pad_token_id, device)
                        continue
                    packed = pack([p for p, _ in part], [t for _, t in part], tokenizer.pad_token_id, device,
                                  flat=config.data.padding_free)
                    with autocast(config.optim, device):
                        hidden_N_H = response_hidden(backbone, packed)
                    logp_N = chunked_token_logprobs(hidden_N_H, output_head(model), packed.targets_N,
                                                    chunk_size=config.optim.chunk_size)
                    # token mean over the whole step (DDP and FSDP average over processes, hence the factor world)
                    (-logp_N.sum() * (world / total_tokens)).backward()
                    loss_sum -= float(logp_N.detach().sum())
            grad_norm, skipped = guarded_step(model, optimizer, config.optim.max_grad_norm)
            progress = advance(progress, step, skipped, total_tokens)
            seconds = time.perf_counter() - started
            log.write(step, {"loss/nll": loss_sum / tokens, "optim/grad_norm": grad_norm, "optim/skipped": skipped,
                             "optim/lr": optimizer.param_groups[0]["lr"], "data/cut_sequences": cut,
                             "throughput/tokens_per_s": tokens / seconds, "time/step_s": seconds},
                      postfix={"nll": loss_sum / tokens})
            checkpoint_or_stop(run_dir, config.run, config.optim.max_skipped_in_a_row, model, tokenizer, optimizer,
                               progress, "sft", start)
    if run_dir is not None:
        print(stage_summary("sft", progress), file=sys.stderr)
    del backbone  # release DDP's reducer / FSDP's state before the process group (see distributed.teardown)
    distributed.teardown()
    return run_dir
