"""The `vllm` engine: vLLM's `LLM` in the training process, fed the trainer's weights in memory.

    engine = VLLMEngine(model, tokenizer, sampling, device, dtype, gather, positions)  # placeholder weights
    engine.ready()                             # every process: send the trainer's weights if they changed
    engine.generate(prompts, sampling, seeds)  # (sends them first itself when nobody called ready)
    engine.idle()                              # sleep mode: free weights and KV cache while training runs
    engine.update_weights()                    # after an optimizer step: send them again before sampling
    engine.close()

The engine is built from the model's config alone (`load_format="dummy"`) and receives every weight
from the trainer's module before its first generation and again after every optimizer step, through
vLLM's `reload_weights` (no disk round trip): the plain model's names, a LoRA student merged on the
fly (`models.merged_weights`, the trainer's modules untouched), the tied output head included
(vLLM keeps a stale head when it is missing). Under FSDP `gather` makes the weights whole on every
process for the sending only (`ready`, which every process calls at the same point); the engine
decodes from its own copy, so nothing stays gathered while it runs.

Sampling matches the hf engine's semantics: temperature (0 = greedy; vLLM raises temperatures below
0.01 to 0.01, so check_sampling refuses them), top-k, then top-p over what is left,
`max_new_tokens`, stop at the model's stop tokens (kept at the end of the response), the truncation
flag, and the log-probability of each sampled token under the processed distribution (vLLM's
`processed_logprobs`). Each request carries its seed (vLLM's per-request generator), so a request's
sample does not depend on the batch; the random streams differ from the hf engine's, so the two
engines draw different samples from the same distribution. vLLM seeds and draws from the process's
global generators too; the engine puts their state back, so opsd's own draws do not move.

Under torchrun every process runs its own engine on its own share of the prompts (vLLM's
`external_launcher`, data-parallel generation as TRL's colocate mode). vLLM's engine shutdown
destroys the default process group; under torchrun `close` destroys vLLM's model-parallel groups and
keeps its world group and the default one (a pipeline's next stage and opsd's group keep working). In one process vLLM
starts and destroys a group of one of its own (`distributed.active` ignores it).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import tempfile
from pathlib import Path

import torch
from torch import nn

from opsd.core.errors import UserError, first_line
from opsd.core.models import causal_lm, merged_weights
from opsd.generation import Generation, SamplingConfig, stop_ids
from opsd.runtime import distributed
from opsd.runtime.faults import crash_point

CPU_KV_CACHE_GIB = 1.0  # sampling.kv_cache_gib=0 on CPU (vLLM's own default would reserve most of the memory)


class VLLMEngine:

    def __init__(self, model: nn.Module, tokenizer, sampling: SamplingConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, gather=None, positions: int = 0):
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
        self.model, self.gather = model, gather or contextlib.nullcontext
        self.eos_ids = stop_ids(model, tokenizer)
        self.stale = True  # the engine holds placeholder weights until the first generate
        self.sleep_mode, self.asleep = sampling.sleep_mode, False
        self.device = device
        dtype = dtype or next(base.parameters()).dtype
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
            **({"max_model_len": length} if length else {}),
            **({"max_num_batched_tokens": sampling.max_num_batched_tokens} if sampling.max_num_batched_tokens else {}),
            **({"kv_cache_memory_bytes": int(kv_gib * 2**30)} if kv_gib else {}),
            **({"distributed_executor_backend": "external_launcher"} if distributed.world_size() > 1 else {}),
        )
        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op; opsd sets threads per run
        try:
            with _random_state_kept(device):  # vLLM seeds the process's generators; opsd's draws must not move
                self.llm = LLM(**options)
        except Exception as err:  # vLLM's many ways of refusing a model: say which and why
            raise UserError(f"sampling.engine=vllm could not start vLLM on this model: {first_line(err)}") from None
        finally:
            torch.set_num_threads = set_threads
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def decoding(self):
        """Nothing gathered: vLLM decodes from its own copy of the weights."""
        return contextlib.nullcontext()

    def ready(self) -> None:
        if self.stale:
            self._send_weights()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[Generation]:
        from vllm import SamplingParams

        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        self.ready()  # the stages call it on every process before their generations; direct callers rely on this one
        longest = max(len(p) for p in prompts)
        if longest >= self.max_model_len:
            raise UserError(f"sampling.engine=vllm: a prompt of {longest} tokens leaves no room in the engine's "
                            f"max_model_len of {self.max_model_len} (sampling.max_model_len)")
        greedy = sampling.temperature == 0
        params = [SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop_token_ids=self.eos_ids, logprobs=None if greedy else 0,
            seed=seed, detokenize=False, skip_special_tokens=False) for seed in seeds]
        with _random_state_kept(self.device):  # vLLM's CPU sampler also draws from the global generator
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        crash_point("decode")  # the tests' kill point: one per call here (per decoded token in the hf engine)
        return [_generation(out.outputs[0], greedy) for out in outputs]

    def idle(self) -> None:
        """Sleep mode: weights and KV cache freed while training runs (vLLM's level 2); sent again on waking."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.stale = True, True

    def update_weights(self) -> None:
        self.stale = True

    @torch.no_grad()
    def _send_weights(self) -> None:
        """The trainer's current weights into the engine (whole, LoRA merged), then a fresh prefix cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        with self.gather():  # FSDP: every process gathers the whole weights for the sending, then frees them
            weights = merged_weights(self.model, dict(causal_lm(self.model).named_parameters(remove_duplicate=False)))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
            del weights
        if self.asleep:
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
        gc.collect()
        self._folder.cleanup()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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

