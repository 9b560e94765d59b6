"""The memory plan of a run: the bytes one process holds in each phase, before any weight loads.

    opsd distill CONFIG [key=value ...] --plan --gpus 8 --gpu-gib 80

From the command's config and the model's config.json (its parameters counted on the meta device, exactly,
for any architecture) and the longest sequence the run will feed it (the stage's own length checks), per
process (GPU):

  load        the weights as they arrive: under FSDP this process's shards and one whole tensor
              broadcast by rank 0 (no process holds the whole model on its GPU), else the whole model
  state       weights (float32 master copy; LoRA: the frozen base in its dtype and float32 adapters),
              gradients and AdamW's two moments of what is trained, a second set of weights (the
              self-teacher's frozen/refresh/EMA snapshot, rlvr's KL reference) — divided by the number of
              processes under run.parallel=fsdp (gradients too: they are reduce-scattered every
              micro-batch); an external teacher, whole, in its dtype
  training    state + one micro-batch's activations (each layer's input with gradient checkpointing, one
              layer's working set; every layer's without) + the chunked divergence's buffers + (FSDP) the
              layers gathered around the one computing; a micro-batch is micro_batch_size sequences padded to
              the longest, or (optim.micro_batch_tokens) that many positions, or one longer sequence
  generation  state + the engine: hf decodes with the trainer's weights (FSDP: gathered whole in the compute
              dtype) and a KV cache of sampling.batch_size sequences; vllm its own weights and KV cache
              (gpu_memory_utilization of the GPU, or kv_cache_gib past its weights)
  teacher     state + (FSDP) the whole weights gathered for the self-teacher's or the reference's forward
              + the teacher's hidden states of a micro-batch

With vllm and no sampling.sleep_mode, its memory stays held in every phase. What the plan leaves out: the
CUDA context and the caching allocator's fragmentation (it keeps 5% of the GPU free for them), and the
activations' exact working set, an estimate (34 bytes per token and hidden unit per layer in bf16, Korthikanti
et al. 2022). The state terms are the ones `benchmarks/fsdp_memory.py` measures to the byte on CPU processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GIB = 1024**3


@dataclass(frozen=True)
class Checks:
    """What `--check` / `--plan` were asked for on the command line."""

    show_plan: bool = False  # print the memory plan
    gpus: int | None = None  # processes (GPUs) the run will have; None: this launch's (WORLD_SIZE)
    gpu_gib: float | None = None  # one GPU's memory; None: this machine's GPU, or no verdict without one
HEADROOM = 0.95  # of the GPU: the CUDA context and the allocator's fragmentation get the rest
LAYER_WORKING_BYTES = 34  # per token and hidden unit: one transformer layer's saved activations in bf16


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a model, read from its config.json on the meta device (no memory)."""

    params: int
    linear_params: dict[str, int]  # name → in + out features of each linear layer (LoRA's adapters)
    hidden: int
    layers: int
    vocab: int
    kv_bytes_per_token: int  # K and V of every layer in bf16
    largest: int = 0  # elements of the largest tensor (the embeddings, as a rule)


def architecture(model_config: Any) -> Architecture:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    linear = {name: m.in_features + m.out_features for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not name.endswith("lm_head")}
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    layers = model_config.num_hidden_layers
    return Architecture(sum(p.numel() for p in model.parameters()), linear, model_config.hidden_size, layers,
                        model_config.vocab_size, layers * 2 * heads * head_dim * 2,
                        max(p.numel() for p in model.parameters()))


def dtype_bytes(name: str) -> int:
    return {"bfloat16": 2, "float16": 2}.get(name, 4)


@dataclass(frozen=True)
class Plan:
    phases: dict[str, dict[str, float]]  # phase → term → bytes of one process
    processes: int
    gpu_bytes: float | None  # None: unknown (no GPU here and no --gpu-gib): no verdict

    def peak(self) -> tuple[str, float]:
        name = max(self.phases, key=lambda phase: sum(self.phases[phase].values()))
        return name, sum(self.phases[name].values())

    def fits(self) -> bool:
        return self.gpu_bytes is None or self.peak()[1] <= HEADROOM * self.gpu_bytes

    def table(self) -> str:
        terms = list(dict.fromkeys(term for phase in self.phases.values() for term in phase))
        lines = [f"| GiB per process ({self.processes} processes) | {' | '.join(self.phases)} |",
                 "|---|" + "---|" * len(self.phases)]
        for term in terms:
            cells = [f"{self.phases[phase].get(term, 0.0) / GIB:.2f}" for phase in self.phases]
            lines.append(f"| {term} | {' | '.join(cells)} |")
        lines.append(f"| **total** | {' | '.join(f'**{sum(p.values()) / GIB:.2f}**' for p in self.phases.values())} |")
        return "\n".join(lines)


def plan(config: Any, arch: Architecture, positions: int, processes: int, gpu_bytes: float | None,
         external: Architecture | None = None, on_gpu: bool = True) -> Plan:
    """The plan of a run of `config` (a distill, rlvr or sft config) on `processes` processes."""
    model, optim, run = config.model, config.optim, config.run
    shards = processes if run.parallel == "fsdp" and processes > 1 else 1
    compute = 2 if (optim.bf16 and on_gpu) else 4
    lora = model.lora_rank > 0
    trained = (sum(model.lora_rank * width for width in arch.linear_params.values()) if lora else arch.params)
    base = (dtype_bytes(model.dtype) * arch.params) if lora else 4 * arch.params
    state = {"weights": (base + (4 * trained if lora else 0)) / shards, "gradients": 4 * trained / shards,
             "optimizer (AdamW)": 8 * trained / shards}
    shadow = _shadow(config)
    if shadow and not (lora and config_policy(config) == "frozen"):  # LoRA's frozen teacher: adapters off, no copy
        state["teacher/reference weights"] = 4 * trained / shards
    teacher_config = getattr(getattr(config, "teacher", None), "model", None)
    if external is not None and teacher_config is not None:
        frozen = compute if teacher_config.dtype == "auto" else dtype_bytes(teacher_config.dtype)  # frozen_dtype
        state["external teacher"] = frozen * external.params
    sampling = getattr(config, "sampling", None)
    held = sampling is not None and sampling.engine == "vllm" and not sampling.sleep_mode
    resident = {"vllm (held)": _vllm_bytes(sampling, arch, gpu_bytes, positions)} if held else {}
    # loading: under FSDP each process receives its shards from rank 0 one whole tensor at a time
    # (distributed.fill_from_rank0); otherwise each loads the whole model on its device
    load = {"weights": state["weights"], "one whole tensor (sent by rank 0)": 4.0 * arch.largest} if shards > 1 \
        else {"weights": base + (4 * trained if lora else 0)}
    phases = {"load": load, "training": {**state, **_training(config, arch, positions, shards, compute), **resident}}
    if sampling is not None:
        phases["generation"] = {**state, **_generation(sampling, arch, positions, shards, compute, gpu_bytes)}
    if hasattr(config, "teacher") or shadow:  # the teacher's forward (distill) or the KL reference's (rlvr)
        gathered = compute * arch.params if shards > 1 and external is None else 0.0
        hidden = _views(config) * micro_batch_positions(optim, positions) * arch.hidden * 4
        phases["teacher"] = {**state, "gathered weights": gathered, "teacher hidden states": float(hidden),
                             **resident}
    return Plan(phases, processes, gpu_bytes)


def config_policy(config: Any) -> str:
    teacher = getattr(config, "teacher", None)
    return teacher.weights.policy if teacher is not None else "frozen"


def _shadow(config: Any) -> bool:
    """Whether the run keeps a second set of weights: the self-teacher's snapshot, or rlvr's KL reference."""
    teacher = getattr(config, "teacher", None)
    if teacher is not None:
        return teacher.model is None and teacher.weights.policy != "live"
    grpo = getattr(config, "grpo", None)
    return grpo is not None and grpo.kl_coef > 0


def _views(config: Any) -> int:
    teacher = getattr(config, "teacher", None)
    return 3 if teacher is not None and teacher.context == "purified" else 1


def micro_batch_positions(optim: Any, positions: int) -> int:
    """The positions one micro-batch holds at most, padding included: `micro_batch_size` sequences padded to
    the longest (`positions`), or with `micro_batch_tokens` its budget, or one longer sequence alone."""
    if optim.micro_batch_tokens > 0:
        return max(optim.micro_batch_tokens, positions)
    return optim.micro_batch_size * positions


def _training(config: Any, arch: Architecture, positions: int, shards: int, compute: int) -> dict[str, float]:
    tokens = micro_batch_positions(config.optim, positions)
    per_layer = tokens * arch.hidden * compute
    if config.optim.gradient_checkpointing:
        activations = arch.layers * per_layer + tokens * arch.hidden * LAYER_WORKING_BYTES
    else:
        activations = arch.layers * tokens * arch.hidden * LAYER_WORKING_BYTES
    terms = {"activations (one micro-batch)": float(activations),
             "divergence/log-prob chunks": 2.0 * config.optim.chunk_size * arch.vocab * 4
             + arch.vocab * arch.hidden * 4}
    if shards > 1:  # a layer computing and the next prefetched, gathered in the compute dtype
        terms["gathered layers"] = 2 * compute * (arch.params / max(arch.layers, 1))
    return terms


def _generation(sampling: Any, arch: Architecture, positions: int, shards: int, compute: int,
                gpu_bytes: float | None) -> dict[str, float]:
    if sampling.engine == "vllm":
        return {"vllm (weights + KV cache)": _vllm_bytes(sampling, arch, gpu_bytes, positions)}
    return {"gathered weights": compute * arch.params if shards > 1 else 0.0,
            "KV cache": float(sampling.batch_size * positions * arch.kv_bytes_per_token),
            "logits": float(sampling.batch_size * arch.vocab * 4)}


def _vllm_bytes(sampling: Any, arch: Architecture, gpu_bytes: float | None, positions: int) -> float:
    weights = 2.0 * arch.params / max(getattr(sampling, "tensor_parallel_size", 1), 1)
    if sampling.kv_cache_gib > 0:
        return weights + sampling.kv_cache_gib * GIB
    least = weights + positions * arch.kv_bytes_per_token  # its weights and one sequence's cache
    if gpu_bytes is None:  # no GPU to take a share of: a full batch's cache
        return weights + positions * arch.kv_bytes_per_token * sampling.batch_size
    return max(sampling.gpu_memory_utilization * gpu_bytes, least)


def vllm_share_too_small(sampling: Any, arch: Architecture, gpu_bytes: float | None, positions: int) -> str:
    """The sentence refusing a vLLM share of the GPU (sampling.gpu_memory_utilization) that cannot hold the
    engine's weights and one sequence's KV cache — vLLM would refuse to start — or "" when it can (or when
    no GPU size is known, or kv_cache_gib sizes the cache instead)."""
    if sampling is None or sampling.engine != "vllm" or gpu_bytes is None or sampling.kv_cache_gib > 0:
        return ""
    weights = 2.0 * arch.params / max(sampling.tensor_parallel_size, 1)
    least = weights + positions * arch.kv_bytes_per_token
    share = sampling.gpu_memory_utilization * gpu_bytes
    if share >= least:
        return ""
    return (f"sampling.gpu_memory_utilization={sampling.gpu_memory_utilization:g} gives vLLM {share / GIB:.1f} GiB of "
            f"the {gpu_bytes / GIB:.0f} GiB GPU, less than its weights in bf16 ({weights / GIB:.1f} GiB) and one "
            f"sequence's KV cache ({positions * arch.kv_bytes_per_token / GIB:.1f} GiB): raise it to at least "
            f"{least / gpu_bytes:.2f} (with sampling.sleep_mode the training phases do not hold it)")


KNOBS = (("run.parallel", "fsdp"), ("optim.gradient_checkpointing", True), ("sampling.sleep_mode", True),
         ("optim.micro_batch_size", 1))


def what_would_fit(config: Any, arch: Architecture, positions: int, processes: int, gpu_bytes: float,
                   external: Architecture | None = None) -> str:
    """The first single change of `KNOBS` that makes the plan fit, as `key=value`; "" when none does."""
    for key, value in KNOBS:
        section, _, field = key.partition(".")
        part = getattr(config, section, None)
        if part is None or getattr(part, field) == value:
            continue
        changed = dataclasses.replace(config, **{section: dataclasses.replace(part, **{field: value})})
        if plan(changed, arch, positions, processes, gpu_bytes, external).fits():
            return f"{key}={str(value).lower() if isinstance(value, bool) else value}"
    return ""


# Qwen3's shapes (their config.json) and the settings docs/scale.md recommends for 8 GPUs of 80 GB
QWEN3_SHAPES = {"Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                   num_attention_heads=16, tie_word_embeddings=True),
                "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                 num_attention_heads=32, tie_word_embeddings=False),
                "Qwen3-14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                                  num_attention_heads=40, tie_word_embeddings=False)}


def qwen3_config(name: str):
    from transformers import Qwen3Config

    return Qwen3Config(**QWEN3_SHAPES[name], num_key_value_heads=8, head_dim=128, vocab_size=151_936,
                       max_position_embeddings=40_960)


def readme_table(gpus: int = 8, gpu_gib: float = 80, positions: int = 16_384) -> str:
    """docs/scale.md's table: `opsd distill` (self-teacher, frozen snapshot) at `positions` tokens per sequence,
    one sequence per micro-batch with gradient checkpointing, vllm in sleep mode, on `gpus` GPUs: the
    peak phase per process under DDP and FSDP, and whether it fits."""
    from opsd.generation import SamplingConfig
    from opsd.runtime.training import OptimConfig
    from opsd.stages.distill import DistillConfig

    lines = [f"| model | params | DDP peak GiB | FSDP {gpus} peak GiB (phase) | fits {gpus}×{gpu_gib:.0f} GB |",
             "|---|---|---|---|---|"]
    for name in QWEN3_SHAPES:
        arch = architecture(qwen3_config(name))
        peaks = {}
        for parallel in ("ddp", "fsdp"):
            config = DistillConfig(optim=OptimConfig(micro_batch_size=1, gradient_checkpointing=True),
                                   sampling=SamplingConfig(engine="vllm", sleep_mode=True, max_new_tokens=positions))
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, parallel=parallel))
            peaks[parallel] = plan(config, arch, positions, gpus, gpu_gib * GIB)
        phase, fsdp = peaks["fsdp"].peak()
        lines.append(f"| {name} | {arch.params / 1e9:.2f}B | {peaks['ddp'].peak()[1] / GIB:.1f} | "
                     f"{fsdp / GIB:.1f} ({phase}) | {'yes' if peaks['fsdp'].fits() else 'no'} (FSDP) |")
    return "\n".join(lines)
