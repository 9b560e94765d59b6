"""The `vllm` engine: vLLM's `LLM` in the training process, fed the trainer's weights in memory.

    engine = VLLMEngine(model, tokenizer, sampling, device, dtype, positions)  # placeholder weights
    engine.ready()                             # every process: send the trainer's weights if they changed
    with engine.decoding():                    # (tensor parallel: the block that may call generate unevenly)
        engine.generate(prompts, sampling, seeds)  # (sends them first itself when nobody called ready)
    engine.idle()                              # sleep mode: free weights and KV cache while training runs
    engine.update_weights()                    # after an optimizer step: send them again before sampling
    engine.close()

The engine is built from the model's config alone (`load_format="dummy"`) and receives every weight
from the trainer's module before its first generation and again after every optimizer step, through
vLLM's `reload_weights` (no disk round trip): the plain model's names, a LoRA student merged on the
fly, the tied output head included (vLLM keeps a stale head when it is missing). The weights stream
in, one piece at a time (`plain_weights`): vLLM loads each tensor as it comes, so no whole copy of
the model exists next to the trainer's. In one process and under DDP a tensor is the trainer's own
parameter (a LoRA weight merged alone, out of place); under FSDP each process all-gathers one
decoder layer at a time (every process in the same order: the all-gathers are collectives), the
root's embeddings, final norm and head one tensor at a time, so what is gathered at once is one
layer or one of those tensors, never the model (the whole bf16 model would be 16 GB at 8B).

GPU memory at the hand-offs (sampling.sleep_mode): the trainer's cached CUDA blocks go back to the
device before vLLM allocates (its start, each wake-up) and when it sleeps; vLLM's sleep mode
allocates outside PyTorch's cache, so blocks PyTorch keeps for the trainer are memory vLLM cannot have.

Sampling matches the hf engine's semantics: temperature (0 = greedy; vLLM raises temperatures below
0.01 to 0.01, so check_sampling refuses them), top-k, then top-p over what is left,
`max_new_tokens`, stop at the model's stop tokens (kept at the end of the response), the truncation
flag, and the log-probability of each sampled token under the processed distribution (vLLM's
`processed_logprobs`). Each request carries its seed (vLLM's per-request generator), so a request's
sample does not depend on the batch; the random streams differ from the hf engine's, so the two
engines draw different samples from the same distribution. vLLM seeds and draws from the process's
global generators too; the engine puts their state back, so opsd's own draws do not move.

Under torchrun every process runs its own engine on its own share of the prompts (vLLM's
`external_launcher`, data-parallel generation as TRL's colocate mode). With
`sampling.tensor_parallel_size` = N > 1, each N consecutive processes (of one node) form one engine,
each holding 1/N of its weights and KV cache; vLLM needs every process of the group to make the same
calls with the same requests, so the group pools its members' requests: each `generate` is a round in
which every member hands in its prompts, the engine decodes them all at once, and each member takes
its own back. A member done with a `decoding()` block keeps joining its group's rounds with nothing
to add until every member is done, so members may call `generate` unequally inside the block
(processes have different shares; the memo teacher writes memos only for kept rollouts). Outside a
block, members call `generate` equally. The stages' data split is unchanged, and per-request seeds
make the samples those of N separate engines.

vLLM's engine shutdown destroys the default process group; under torchrun `close` destroys vLLM's
model-parallel groups and keeps its world group and the default one (a pipeline's next stage and
opsd's group keep working). In one process vLLM starts and destroys a group of one of its own
(`distributed.active` ignores it).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from opsd.core.errors import UserError, first_line
from opsd.core.models import causal_lm
from opsd.generation import Generation, SamplingConfig, stop_ids
from opsd.runtime import distributed
from opsd.runtime.faults import crash_point

CPU_KV_CACHE_GIB = 1.0  # sampling.kv_cache_gib=0 on CPU (vLLM's own default would reserve most of the memory)


class VLLMEngine:

    def __init__(self, model: nn.Module, tokenizer, sampling: SamplingConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, positions: int = 0):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights pass in memory
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # else a warning per reload about rotary buffers
        try:
            from vllm import LLM
        except Exception as err:  # a broken install raises anything at import
            raise UserError(f"sampling.engine=vllm: vLLM is installed but does not import "
                            f"({first_line(err)})") from None

        base = causal_lm(model)
        device = device or next(base.parameters()).device  # the run's device (run.fsdp_offload keeps weights on CPU)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda" and device.index not in (None, local):
            raise UserError(f"sampling.engine=vllm runs on the process's own GPU (cuda:{local}, LOCAL_RANK), not on "
                            f"{device}: set run.device=cuda or CUDA_VISIBLE_DEVICES")
        self.model = model
        self.eos_ids = stop_ids(model, tokenizer)
        self.stale = True  # the engine holds placeholder weights until the first generate
        self.sleep_mode, self.asleep = sampling.sleep_mode, False
        self.device = device
        self.dtype = dtype = dtype or next(base.parameters()).dtype
        check_servable(base, device)
        self._folder = tempfile.TemporaryDirectory(prefix="opsd-vllm-")  # config + tokenizer: what vLLM starts from
        base.config.save_pretrained(self._folder.name)
        _name_the_architecture(Path(self._folder.name) / "config.json", type(base).__name__)
        tokenizer.save_pretrained(self._folder.name)
        cpu = device.type == "cpu"
        kv_gib = sampling.kv_cache_gib or (CPU_KV_CACHE_GIB if cpu else 0)
        context = getattr(base.config, "max_position_embeddings", None)
        length = sampling.max_model_len or (min(positions, context or positions) if positions else context)
        options = dict(
            model=self._folder.name, load_format="dummy", dtype=str(dtype).removeprefix("torch."), seed=0,
            max_num_seqs=sampling.batch_size, logprobs_mode="processed_logprobs", generation_config="vllm",
            gpu_memory_utilization=sampling.gpu_memory_utilization, enable_prefix_caching=True,
            enforce_eager=cpu or sampling.enforce_eager,  # CPU: no compilation (minutes on a small machine)
            # CPU: a prompt's prefill split over steps rewinds its seeded generator, which CPU generators cannot
            enable_chunked_prefill=not cpu,
            enable_sleep_mode=sampling.sleep_mode,
            tensor_parallel_size=sampling.tensor_parallel_size,
            **({"max_model_len": length} if length else {}),
            **({"max_num_batched_tokens": sampling.max_num_batched_tokens} if sampling.max_num_batched_tokens else {}),
            **({"kv_cache_memory_bytes": int(kv_gib * 2**30)} if kv_gib else {}),
            **({"distributed_executor_backend": "external_launcher"} if distributed.world_size() > 1 else {}),
        )
        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op; opsd sets threads per run
        release_cached_blocks(device)  # vLLM measures the free memory and takes its share
        try:
            with _random_state_kept(device):  # vLLM seeds the process's generators; opsd's draws must not move
                self.llm = LLM(**options)
        except Exception as err:  # vLLM's many ways of refusing a model: say which and why
            raise UserError(f"sampling.engine=vllm could not start vLLM on this model: {first_line(err)}") from None
        finally:
            torch.set_num_threads = set_threads
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.group = _tensor_parallel_group() if sampling.tensor_parallel_size > 1 else None

    @contextlib.contextmanager
    def decoding(self):
        """Nothing gathered: vLLM decodes from its own copy of the weights. Tensor parallel: on leaving,
        this process joins its group's rounds until every member has left (module docstring)."""
        yield
        if self.group is not None:
            while self._round(None) is not None:
                pass

    def ready(self) -> None:
        if self.stale:
            self._send_weights()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[Generation]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if self.group is None and not prompts:
            return []
        self.ready()  # the stages call it on every process before their generations; direct callers rely on this one
        requests = [(prompt, sampling, seed) for prompt, seed in zip(prompts, seeds)]
        generations = self._decode(requests) if self.group is None else self._round(requests)
        crash_point("decode")  # the tests' kill point: one per call here (per decoded token in the hf engine)
        return generations

    def _round(self, requests: list[tuple] | None) -> list[Generation] | None:
        """One decoding for the tensor-parallel group: every member's requests (None from a member that
        has left its decoding block) decoded together, as vLLM needs; this member's generations back,
        None once every member has left."""
        pooled = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(pooled, requests, group=self.group)
        if all(member is None for member in pooled):
            return None
        generations = self._decode([request for member in pooled for request in member or []])
        start = sum(len(member or []) for member in pooled[:dist.get_rank(self.group)])
        return generations[start : start + len(requests or [])]

    def _decode(self, requests: list[tuple]) -> list[Generation]:
        """(prompt, sampling, seed) requests on this process's engine, in one call."""
        from vllm import SamplingParams

        if not requests:
            return []
        if self.stale:  # a group member that never called ready(): its engine would answer with other weights
            raise RuntimeError("the vllm engine was asked to decode before it was sent the weights: call ready() on "
                               "every process before a decoding block")
        longest = max(len(prompt) for prompt, _, _ in requests)
        if longest >= self.max_model_len:
            raise UserError(f"sampling.engine=vllm: a prompt of {longest} tokens leaves no room in the engine's "
                            f"max_model_len of {self.max_model_len} (sampling.max_model_len)")
        params = [SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop_token_ids=self.eos_ids,
            logprobs=None if sampling.temperature == 0 else 0, seed=seed, detokenize=False, skip_special_tokens=False)
            for _, sampling, seed in requests]
        with _random_state_kept(self.device):  # vLLM's CPU sampler also draws from the global generator
            outputs = self.llm.generate([{"prompt_token_ids": prompt} for prompt, _, _ in requests], params,
                                        use_tqdm=False)
        greedy = [sampling.temperature == 0 for _, sampling, _ in requests]
        return [_generation(out.outputs[0], is_greedy) for out, is_greedy in zip(outputs, greedy)]

    def idle(self) -> None:
        """Sleep mode: weights and KV cache freed while training runs (vLLM's level 2); sent again on
        waking. What decoding left in PyTorch's cache goes back to the device with them."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.stale = True, True
            release_cached_blocks(self.device)

    def update_weights(self) -> None:
        self.stale = True

    @torch.no_grad()
    def _send_weights(self) -> None:
        """The trainer's current weights into the engine as they stream (`plain_weights`), then a fresh
        prefix cache. Waking from sleep, the trainer's cached blocks go back to the device first: vLLM's
        wake-up allocates outside PyTorch's cache."""
        if self.asleep:
            release_cached_blocks(self.device)
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": plain_weights(self.model, self.dtype)})
        if self.asleep:
            release_cached_blocks(self.device)  # the layers gathered for the sending too, before the KV cache wakes
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
        self.stale = False

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        import vllm.v1.engine.core as core

        cleanup = core.cleanup_dist_env_and_memory
        if distributed.world_size() > 1:  # vLLM's would destroy the default process group: opsd's, still in use
            core.cleanup_dist_env_and_memory = _cleanup_keeping_the_process_group
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            core.cleanup_dist_env_and_memory = cleanup
        del llm
        self.group = None
        gc.collect()
        self._folder.cleanup()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plain_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain model's weights (transformers' names, the tied head under both of its names), one
    tensor at a time, each LoRA adapter merged into its base weight out of place (merging into the live
    weights and back would not restore them exactly in low precision, and the frozen teacher of a LoRA
    run *is* those base weights). In one process and under DDP a tensor is the parameter itself (a
    merged one is made alone). Under FSDP the root's tensors come first, each gathered alone in `dtype`
    (the engine's), then one decoder layer at a time, gathered as FSDP gathers it and copied out
    tensor by tensor (vLLM may keep a tensor until the rest of its own layer has come, and FSDP frees
    the gathered layer as the next one comes). The gathers are collectives: every process consumes
    the whole stream, in the same order."""
    base = causal_lm(model)
    named = list(base.named_modules(remove_duplicate=False))
    layers = getattr(base.get_decoder(), "layers", None) or []
    sharded = [layer for layer in layers if distributed.is_sharded(layer)]
    owner = {id(module): index for index, layer in enumerate(sharded) for module in layer.modules()}
    adapters = _lora_layers(model)
    yield from _weights_of([(name, m) for name, m in named if id(m) not in owner], adapters, dtype, copy=False)
    for index, layer in enumerate(sharded):
        with distributed.unsharded(layer):
            yield from _weights_of([(name, m) for name, m in named if owner.get(id(m)) == index], adapters, dtype,
                                   copy=True)


def _weights_of(named: list[tuple[str, nn.Module]], adapters: dict[str, nn.Module], dtype: torch.dtype,
                copy: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain weights of these modules, each module's own parameters (`copy`: copies of them)."""
    for name, module in named:
        for key, param in module.named_parameters(prefix=name, recurse=False):
            if "lora_" in key:  # an adapter's own factors: merged into their base weight below
                continue
            tensor = _whole(param, dtype)
            lora = adapters.get(name.removesuffix(".base_layer")) if key.endswith(".base_layer.weight") else None
            if lora is not None:
                delta = sum(lora.get_delta_weight(adapter) for adapter in lora.active_adapters)
                tensor = tensor + delta.to(tensor.dtype)
            elif copy:
                tensor = tensor.clone()
            yield key.replace(".base_layer.", "."), tensor


def _whole(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A sharded FSDP parameter (the root's) gathered alone in `dtype`; any other as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.detach().to(dtype).full_tensor()
    return param.detach()


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-adapted modules by name in the transformers model (none without PEFT)."""
    if not hasattr(model, "get_base_model"):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in causal_lm(model).named_modules() if isinstance(module, LoraLayer)}


def release_cached_blocks(device: torch.device) -> None:
    """PyTorch's cached, unused CUDA blocks back to the device: vLLM's allocations (its start, its
    wake-ups from sleep mode) are made outside PyTorch's cache and cannot use them. A no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tensor_parallel_group():
    """The gloo group of the processes that share this engine (vLLM's tensor-parallel group)."""
    from vllm.distributed import get_tp_group

    return get_tp_group().cpu_group


def _cleanup_keeping_the_process_group() -> None:
    """vLLM's engine cleanup under torchrun without its last part: its model-parallel groups go, its
    world group and the default process group (opsd's) stay for the next engine and the run."""
    from vllm import envs
    from vllm.distributed.parallel_state import destroy_model_parallel

    envs.disable_envs_cache()
    destroy_model_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _name_the_architecture(config_json: Path, name: str) -> None:
    """A config saved from a model built with `from_config` has no `architectures`; vLLM then picks
    the base model, which cannot generate."""
    config = json.loads(config_json.read_text())
    if not config.get("architectures"):
        config["architectures"] = [name]
        config_json.write_text(json.dumps(config, indent=2))


@contextlib.contextmanager
def _random_state_kept(device: torch.device):
    """Python's, NumPy's and torch's (CPU and this GPU's) random states as they were before the block."""
    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def _generation(completion, greedy: bool) -> Generation:
    ids = list(completion.token_ids)
    if greedy:
        logprobs = torch.zeros(len(ids), dtype=torch.float32)
    else:
        logprobs = torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, ids)],
                                dtype=torch.float32)
    return Generation(ids, logprobs, completion.finish_reason == "length")


def check_servable(model: nn.Module, device: torch.device) -> None:
    """What vLLM would only find out at its first forward, said before anything starts."""
    if device.type != "cpu":
        return
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,  # imported by LLM above: it imports
    )

    config = model.config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise UserError(f"sampling.engine=vllm: vLLM's CPU backend supports attention heads of "
                        f"{', '.join(map(str, sizes))} dimensions; this model's have {head} (use sampling.engine=hf)")

