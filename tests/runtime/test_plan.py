"""The memory plan (`--plan`, runtime/plan.py): parameters counted as transformers builds the model, its state
terms the same as the per-process figures `benchmarks/fsdp_memory.py` measures to the byte, LoRA's trained
parameters as PEFT makes them, and the verdict and the knob on an 8B-shaped model with no weights."""

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config

from opsd.cli import main
from opsd.core.models import ModelConfig, add_lora
from opsd.core.tiny import build_tiny, char_tokenizer, tiny_config
from opsd.runtime.memory import state_bytes
from opsd.runtime.plan import GIB, architecture, plan, qwen3_config, readme_table
from opsd.stages.distill import DistillConfig

ROOT = Path(__file__).resolve().parents[2]


def test_parameters_are_counted_as_transformers_builds_the_model():
    model, tokenizer = build_tiny(hidden_size=64, num_layers=3)
    assert architecture(tiny_config(len(tokenizer), 64, 3)).params == sum(p.numel() for p in model.parameters())
    assert [round(architecture(qwen3_config(n)).params / 1e8) / 10 for n in ("Qwen3-1.7B", "Qwen3-8B", "Qwen3-14B")] \
        == [1.7, 8.2, 14.8]


@pytest.mark.parametrize("parallel,processes", [("ddp", 1), ("fsdp", 2), ("fsdp", 8)])
def test_the_state_terms_are_the_measured_ones(parallel, processes):
    """weights, gradients, AdamW and the snapshot: the figures fsdp_memory.py checks to the byte on CPU processes."""
    arch = architecture(tiny_config(len(char_tokenizer()), 256, 4))
    config = DistillConfig()
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, parallel=parallel))
    state = plan(config, arch, 64, processes, None, on_gpu=False).phases["training"]
    expected = state_bytes(arch.params, processes, parallel)
    assert (state["weights"], state["gradients"], state["optimizer (AdamW)"], state["teacher/reference weights"]) == \
        (expected["weights"], expected["gradients"], expected["optimizer"], expected["teacher"])


def test_lora_trains_what_peft_adds():
    model, tokenizer = build_tiny(hidden_size=64, num_layers=2)
    lora = add_lora(model, ModelConfig(lora_rank=4))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    config = DistillConfig(model=ModelConfig(lora_rank=4))
    state = plan(config, architecture(tiny_config(len(tokenizer))), 64, 1, None, on_gpu=False).phases["training"]
    assert state["gradients"] == 4 * adapters and state["optimizer (AdamW)"] == 8 * adapters
    assert "teacher/reference weights" not in state  # LoRA's frozen teacher is the base: no copy


def qwen3_8b_without_weights(folder: Path) -> Path:
    Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=False,
                max_position_embeddings=40_960).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_an_8b_run_on_8_gpus_is_refused_under_ddp_with_the_knob_and_fits_under_fsdp(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = qwen3_8b_without_weights(tmp_path / "qwen3-8b")
    args = ["distill", "configs/tiny.yaml", f"model.name_or_path={model}", "sampling.max_new_tokens=16000",
            "optim.micro_batch_size=1", "optim.gradient_checkpointing=true", "--gpus", "8", "--gpu-gib", "80"]
    assert main([*args, "--check"]) == 2
    err = capsys.readouterr().err
    assert "the memory plan does not fit" in err and "run.parallel=fsdp would make it fit" in err
    assert main([*args, "run.parallel=fsdp", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "| GiB per process (8 processes) | training | generation | teacher |" in out and "| **total** |" in out


def test_the_readme_shows_the_plan_table_as_computed():
    assert readme_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_no_gpu_and_no_size_gives_a_plan_without_a_verdict():
    arch = architecture(qwen3_config("Qwen3-14B"))
    memory = plan(DistillConfig(), arch, 16_384, 1, None)
    assert memory.fits() and memory.peak()[1] > 200 * GIB  # 14B under DDP on one process: no verdict without a size
    assert torch.cuda.is_available() or memory.gpu_bytes is None
