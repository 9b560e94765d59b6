"""The teacher forward really computes with the policy's weights; LoRA checkpoints merge exactly."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opsd.core.models import Backbone, ModelConfig, add_lora
from opsd.core.tiny import build_tiny
from opsd.runtime.checkpoint import save_checkpoint
from opsd.teacher.weights import TeacherWeightsConfig, TeacherWeightsState

IDS = torch.tensor([[5, 17, 30, 41, 8, 9]])


def hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return Backbone(model)(IDS, torch.ones_like(IDS))


def train_a_little(model, seed: int) -> None:
    """Stand-in for optimizer steps: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def teacher_hidden(state: TeacherWeightsState, model) -> torch.Tensor:
    with state.active():
        return hidden(model)


def test_frozen_teacher_computes_with_the_initial_weights():
    model, _ = build_tiny(seed=2)
    initial = hidden(model)
    state = TeacherWeightsState(model, TeacherWeightsConfig("frozen"), uses_lora=False)
    train_a_little(model, 0)
    moved = hidden(model)
    assert not torch.allclose(moved, initial)
    for step in (1, 2, 3):
        state.after_step(step)
        torch.testing.assert_close(teacher_hidden(state, model), initial)
        torch.testing.assert_close(hidden(model), moved)  # the student's weights are back after the block
    assert state.head() is not model.get_output_embeddings().weight
    torch.testing.assert_close(state.head(), build_tiny(seed=2)[0].get_output_embeddings().weight)


def test_refresh_teacher_takes_the_student_every_m_steps():
    model, _ = build_tiny(seed=2)
    initial = hidden(model)
    state = TeacherWeightsState(model, TeacherWeightsConfig("refresh", refresh_every=2), uses_lora=False)
    train_a_little(model, 1)
    assert state.after_step(1) is False
    torch.testing.assert_close(teacher_hidden(state, model), initial)
    train_a_little(model, 2)
    at_step_2 = hidden(model)
    assert state.after_step(2) is True
    torch.testing.assert_close(teacher_hidden(state, model), at_step_2)
    train_a_little(model, 3)
    state.after_step(3)
    torch.testing.assert_close(teacher_hidden(state, model), at_step_2)
    assert not torch.allclose(hidden(model), at_step_2)


def test_ema_teacher_is_the_exponential_average():
    model, _ = build_tiny(seed=2)
    start = copy.deepcopy(model)
    state = TeacherWeightsState(model, TeacherWeightsConfig("ema", ema_decay=0.75), uses_lora=False)
    train_a_little(model, 4)
    state.after_step(1)
    expected = copy.deepcopy(start)
    with torch.no_grad():
        for e, s, p in zip(expected.parameters(), start.parameters(), model.parameters()):
            e.copy_(0.75 * s + 0.25 * p)
    torch.testing.assert_close(teacher_hidden(state, model), hidden(expected))


def test_live_teacher_is_the_current_student():
    model, _ = build_tiny(seed=2)
    state = TeacherWeightsState(model, TeacherWeightsConfig("live"), uses_lora=False)
    train_a_little(model, 5)
    torch.testing.assert_close(teacher_hidden(state, model), hidden(model))
    assert state.state_dict() == {}


def lora_model(seed=3):
    pytest.importorskip("peft")
    base, tokenizer = build_tiny(seed=seed)
    reference = copy.deepcopy(base)
    model = add_lora(base, ModelConfig(lora_rank=4, lora_alpha=8.0))
    train_a_little(model, 6)  # non-zero adapters, as after training
    return model, reference, tokenizer


def test_lora_frozen_teacher_is_the_base_model_without_a_copy():
    model, reference, _ = lora_model()
    state = TeacherWeightsState(model, TeacherWeightsConfig("frozen"), uses_lora=True)
    assert state.snapshot is None and state.state_dict() == {}
    assert not torch.allclose(hidden(model), hidden(reference))
    torch.testing.assert_close(teacher_hidden(state, model), hidden(reference))


def test_lora_checkpoint_is_merged_exactly_and_leaves_the_live_weights_alone(tmp_path):
    model, _, tokenizer = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(IDS).logits
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"step": 1})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in load_file(str(tmp_path / "ckpt" / "model.safetensors")))
