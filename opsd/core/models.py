"""Loading a policy and its tokenizer safely, and reading final hidden states from it.

Safe by default: weights only from safetensors and no code from the model folder runs unless the
user sets `trust_remote_code` / `allow_pickle`. `builtin:tiny` builds the local tiny model instead
(see opsd/core/tiny.py) so that the example and the tests need nothing from a hub.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opsd.core.errors import UserError, first_line

BUILTIN_TINY = "builtin:tiny"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"  # a real 135M chat model, converted offline (core/smollm2.py)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = BUILTIN_TINY  # HF folder or hub name; builtin:tiny = the local tiny model,
    #   builtin:smollm2-135m-instruct = SmolLM2-135M-Instruct converted once into opsd's cache (opsd[smollm2])
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # weights; auto = float32 for a trained
    #   model (bf16 comes from autocast), the compute dtype for a frozen one (an external teacher, an evaluated
    #   checkpoint): bf16 on GPU
    trust_remote_code: bool = False  # run Python code shipped in the model folder (off: never by default)
    allow_pickle: bool = False  # allow .bin (pickle) weights; off: safetensors only
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (when installed)
    lora_rank: int = 0  # > 0 trains LoRA adapters of this rank (PEFT) instead of all weights
    lora_alpha: float = 16.0  # LoRA scaling numerator
    lora_target_modules: str = "all-linear"  # PEFT target_modules ("all-linear" or comma-separated names)


def resolve_dtype(name: str) -> torch.dtype:
    """Trained weights stay float32 (the optimizer's master copy); compute runs under bf16 autocast
    on GPU. bfloat16/float16 weights are meant for LoRA, where the base weights never change."""
    return torch.float32 if name == "auto" else getattr(torch, name)


def frozen_dtype(config: ModelConfig, device: torch.device, bf16: bool = True) -> ModelConfig:
    """`config` with `dtype: auto` resolved for a model that is never trained (an external teacher, an
    evaluated checkpoint): the compute dtype, bf16 on a GPU (with `bf16`), float32 elsewhere."""
    if config.dtype == "auto" and device.type == "cuda" and bf16:
        return dataclasses.replace(config, dtype="bfloat16")
    return config


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    if config.name_or_path == BUILTIN_TINY:
        from opsd.core.tiny import char_tokenizer

        return char_tokenizer()
    path = local_path(config.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=config.trust_remote_code
        )
    except Exception as err:  # transformers raises OSError/ValueError/… depending on what is missing
        raise UserError(f"could not load a tokenizer from {config.name_or_path} ({first_line(err)})") from None
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {config.name_or_path} has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, device: torch.device) -> PreTrainedModel:
    dtype = resolve_dtype(config.dtype)
    if config.name_or_path == BUILTIN_TINY:
        from opsd.core.tiny import build_tiny

        model = build_tiny()[0].to(dtype)
    else:
        path = local_path(config.name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                trust_remote_code=config.trust_remote_code,
                use_safetensors=None if config.allow_pickle else True,
                attn_implementation=config.attn_implementation,
            )
        except Exception as err:
            raise UserError(f"could not load a model from {config.name_or_path} ({first_line(err)})") from None
    _check_logits(model.config, config.name_or_path)
    return model.to(device)


def empty_model(config: ModelConfig) -> PreTrainedModel:
    """The model's architecture on the meta device, without a byte of weights: what each process of a
    sharded run builds, shards, and then receives its shards into (`distributed.fill_from_rank0`)."""
    architecture = model_config(config)
    _check_logits(architecture, config.name_or_path)
    options = {} if config.name_or_path == BUILTIN_TINY else {"attn_implementation": config.attn_implementation}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(architecture, dtype=resolve_dtype(config.dtype),
                                                trust_remote_code=config.trust_remote_code, **options)


def _check_logits(architecture: PretrainedConfig, name: str) -> None:
    for option in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(architecture, option, None) not in (None, 1, 1.0):
            raise UserError(f"{name} transforms its logits ({option}), which the chunked divergence does not model")


def add_lora(model: PreTrainedModel, config: ModelConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing`: not ours to change, not the
            # user's concern
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            peft_model = get_peft_model(model, lora)
    except (ValueError, KeyError, TypeError) as err:  # PEFT's error for targets that match nothing is a ValueError
        raise UserError(f"model.lora_target_modules={targets!r} cannot be used ({first_line(err)})") from None
    if hasattr(causal_lm(peft_model).get_output_embeddings(), "lora_A"):
        raise UserError("model.lora_target_modules must not adapt the output layer: the chunked divergence reads its "
                        "plain weight")
    return peft_model


def lora_not_linear(model: nn.Module) -> str | None:
    """The first LoRA-adapted module that is not a linear layer ("name (Type)"), or None: a sharded
    checkpoint merges adapters from their gathered tensors, which opsd does for linear layers."""
    if not hasattr(model, "get_base_model"):
        return None
    from peft.tuners.lora import Linear as LoraLinear

    for name, module in causal_lm(model).named_modules():
        if hasattr(module, "lora_A") and not isinstance(module, LoraLinear):
            return f"{name} ({type(module).__name__})"
    return None


def local_path(name_or_path: str) -> str:
    """What transformers loads for `name_or_path`: a built-in real model's cached folder (built on
    first use), else the folder or hub name itself, once checked."""
    if name_or_path == BUILTIN_SMOLLM2:
        from opsd.core import smollm2

        return str(smollm2.folder())
    _check_model_path(name_or_path)
    return name_or_path


def _check_model_path(name_or_path: str) -> None:
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"model path {name_or_path} is not a model folder (no config.json)")


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers model under any PEFT or DDP wrapper."""
    while not isinstance(model, PreTrainedModel):
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        else:
            raise TypeError(f"cannot find a transformers model inside {type(model).__name__}")
    return model


class Backbone(nn.Module):
    """Final hidden states (after the last norm) of a causal LM, without computing any logits.

    A module of its own so that DistributedDataParallel or FSDP can wrap exactly what the student runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        decoder = causal_lm(self.model).get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state


def model_config(config: ModelConfig) -> PretrainedConfig:
    """The model's architecture and context (its config.json), read without its weights."""
    if config.name_or_path == BUILTIN_TINY:
        from opsd.core.tiny import char_tokenizer, tiny_config

        return tiny_config(len(char_tokenizer()))
    path = local_path(config.name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except Exception as err:  # transformers raises OSError/ValueError/… depending on what is missing
        raise UserError(f"could not read the model config of {config.name_or_path} ({first_line(err)})") from None


def check_fits(model: nn.Module | PretrainedConfig, positions: int, what: str) -> None:
    """Refuse work whose sequences would run past the model's context (position embeddings); `model`
    the loaded model or only its config (`model_config`)."""
    config = model if isinstance(model, PretrainedConfig) else causal_lm(model).config
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and positions > context:
        raise UserError(f"{what} needs {positions} positions, more than the model's context of {context}")


@torch.no_grad()
def merged_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (named as in the transformers model) with each LoRA adapter's delta added to its base
    weight and the adapters' own entries dropped: the plain model's names. Built out of place: merging
    into the live weights and back would not restore them exactly in low precision, and the frozen
    teacher of a LoRA run *is* those base weights. Without PEFT, `state` as it is."""
    if not hasattr(model, "get_base_model"):
        return state
    from peft.tuners.lora import LoraLayer

    state = dict(state)
    for name, module in causal_lm(model).named_modules():
        if isinstance(module, LoraLayer):
            key = f"{name}.base_layer.weight"
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
            state[key] = state[key] + delta.to(state[key].dtype)
    return {key.replace(".base_layer.", "."): value for key, value in state.items() if "lora_" not in key}


def output_head(model: nn.Module) -> torch.Tensor:
    """The [V × H] unembedding matrix; a bias would be silently ignored, so it is refused."""
    head = causal_lm(model).get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError("models whose output layer has a bias are not supported by the chunked divergence")
    return head.weight
