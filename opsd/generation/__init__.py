"""Generation: the one small interface through which every stage samples responses.

    engine = make_engine(model, tokenizer, sampling)       # `sampling.engine` is dispatched here only
    generations = engine.generate(prompts, sampling, seeds)  # one Generation per prompt
    ... optimizer step ...
    engine.update_weights()                                  # the engine now samples from the new weights

An engine returns, per request: the response ids (ending with a stop token unless truncated), the
log-probability of each sampled token under the distribution it was drawn from (after temperature,
top-k and top-p), and whether the budget cut it short. Every request carries its own seed, so what a
request samples does not depend on which other requests share its batch, on the batch size or on
the number of processes. The first engine, `hf`, is our KV-cache sampler over the transformers
forward of the training process's own module (opsd/generation/hf.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from opsd.errors import require
from opsd.models import causal_lm

EngineName = Literal["hf"]


@dataclass(frozen=True)
class SamplingConfig:
    engine: EngineName = "hf"  # hf = our KV-cache sampler on the training process's own weights
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 256  # response budget; longer responses are truncated
    n: int = 1  # samples per problem
    batch_size: int = 64  # sequences decoded together


def check_sampling(config: SamplingConfig, prefix: str) -> None:
    require(
        (f"{prefix}.temperature", config.temperature == 0 or config.temperature >= 1e-3,
         "0 (greedy) or at least 0.001"),
        (f"{prefix}.top_p", 0.0 < config.top_p <= 1.0, "in (0, 1]"),
        (f"{prefix}.top_k", config.top_k >= 0, "non-negative (0 = off)"),
        (f"{prefix}.max_new_tokens", config.max_new_tokens >= 1, "at least 1"),
        (f"{prefix}.n", config.n >= 1, "at least 1"),
        (f"{prefix}.batch_size", config.batch_size >= 1, "at least 1"),
    )


@dataclass(frozen=True)
class Generation:
    response_ids: list[int]  # sampled tokens, ending with a stop token unless truncated
    logprobs: torch.Tensor  # [len(response_ids)] float32, under the sampling distribution (0 when greedy)
    truncated: bool  # hit max_new_tokens without a stop token


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[Generation]:
        """One generation per prompt; `seeds[i]` alone decides the random draws of request i."""

    def update_weights(self) -> None:
        """Called after every optimizer step: from now on, sample from the trainer's current weights."""


def make_engine(model: nn.Module, tokenizer, sampling: SamplingConfig) -> Engine:
    """The engine named by `sampling.engine` for `model` (under any PEFT/DDP wrapper)."""
    if sampling.engine == "hf":
        from opsd.generation.hf import HFEngine

        return HFEngine(model, tokenizer)
    raise ValueError(f"unknown sampling engine {sampling.engine!r}")


def request_seed(*parts: int | str) -> int:
    """A 63-bit seed from (run seed, step, problem, sample, ...): stable across runs, machines and
    process counts, so a resumed or re-sharded run draws the same samples."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the model's generation-config EOS (int or list)."""
    configured = getattr(getattr(causal_lm(model), "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    return sorted({tokenizer.eos_token_id, *configured} - {None})
