"""No deprecation notices from our use of transformers: the KV-cache sampler passes `cache=` (not
`past_key_values=`) and activation checkpointing is switched on by its current name, on the releases
that renamed them (5.24 on); older releases get the old names, which they do not warn about. Every
FutureWarning/DeprecationWarning raised during the calls fails the test, whichever module it is
attributed to: transformers' keyword deprecation is reported at torch's Module.__call__, so a filter
on transformers' modules alone would miss it."""

from __future__ import annotations

import warnings

import pytest
import torch

from opsd.core.models import Backbone, ModelConfig
from opsd.core.prompts import render_prompt
from opsd.core.tiny import build_tiny
from opsd.generation import SamplingConfig
from opsd.generation.hf import sample
from opsd.runtime.training import OptimConfig, load_policy


def deprecations(record: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in record if issubclass(w.category, (FutureWarning,
                                                                                               DeprecationWarning))]


def test_sampling_uses_the_current_cache_argument():
    model, tokenizer = build_tiny(seed=1)
    prompts = [render_prompt(tokenizer, "What is 2+2?"), render_prompt(tokenizer, "Hi")]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        generations = sample(model.eval(), prompts, SamplingConfig(temperature=0.7, max_new_tokens=8),
                             [tokenizer.eos_token_id], tokenizer.pad_token_id, [0, 1])
    assert [len(g.response_ids) for g in generations] and deprecations(record) == []


def test_activation_checkpointing_uses_the_current_name():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = load_policy(ModelConfig(), OptimConfig(gradient_checkpointing=True), torch.device("cpu"))
        model.train()
        hidden = Backbone(model)(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long))
        hidden.sum().backward()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing  # <5.24: the old name
    assert deprecations(record) == []


def test_lora_setup_emits_none_either():
    pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_policy(ModelConfig(lora_rank=4), OptimConfig(gradient_checkpointing=True), torch.device("cpu"))
    assert deprecations(record) == []
