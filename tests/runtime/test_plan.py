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
from opsd.runtime.plan import GIB, LAYER_WORKING_BYTES, architecture, plan, qwen3_config, readme_table
from opsd.runtime.training import OptimConfig
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


def test_loading_under_fsdp_holds_a_shard_and_one_whole_tensor_and_a_frozen_teacher_its_compute_dtype():
    """The load phase as distributed.fill_from_rank0 does it (test_fsdp measures it on two processes), and an
    external teacher with dtype auto in bf16 on a GPU (teacher.target.frozen_dtype)."""
    arch = architecture(qwen3_config("Qwen3-8B"))
    assert arch.largest == 151_936 * 4096  # the embeddings (and the untied head)
    config = DistillConfig()
    fsdp = dataclasses.replace(config, run=dataclasses.replace(config.run, parallel="fsdp"))
    load = plan(fsdp, arch, 64, 8, None).phases["load"]
    assert load == {"weights": 4 * arch.params / 8, "one whole tensor (sent by rank 0)": 4.0 * arch.largest}
    assert plan(config, arch, 64, 8, None).phases["load"] == {"weights": 4 * arch.params}  # DDP: whole
    student = architecture(qwen3_config("Qwen3-1.7B"))
    external = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, model=ModelConfig("x")))
    for on_gpu, expected in ((True, 2), (False, 4)):
        state = plan(external, student, 64, 1, None, arch, on_gpu=on_gpu).phases["training"]
        assert state["external teacher"] == expected * arch.params


def test_an_external_teacher_loads_in_the_compute_dtype_on_a_gpu_unless_told():
    from opsd.core.models import frozen_dtype

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert frozen_dtype(ModelConfig("x"), gpu, bf16=True).dtype == "bfloat16"
    assert frozen_dtype(ModelConfig("x"), cpu, bf16=True).dtype == "auto"  # float32 on CPU, as it computes
    assert frozen_dtype(ModelConfig("x"), gpu, bf16=False).dtype == "auto"
    assert frozen_dtype(ModelConfig("x", dtype="float32"), gpu, bf16=True).dtype == "float32"


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
    assert "| GiB per process (8 processes) | load | training | generation | teacher |" in out
    assert "| **total** |" in out


def test_the_docs_show_the_plan_table_as_computed():
    assert readme_table() in (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")


def test_no_gpu_and_no_size_gives_a_plan_without_a_verdict():
    arch = architecture(qwen3_config("Qwen3-14B"))
    memory = plan(DistillConfig(), arch, 16_384, 1, None)
    assert memory.fits() and memory.peak()[1] > 200 * GIB  # 14B under DDP on one process: no verdict without a size
    assert torch.cuda.is_available() or memory.gpu_bytes is None


def test_a_token_budget_plans_that_many_positions_per_micro_batch():
    """optim.micro_batch_tokens: a micro-batch's activations and teacher hidden states are the budget's
    positions (or one longer sequence's), not micro_batch_size sequences padded to the longest."""
    arch = architecture(qwen3_config("Qwen3-1.7B"))
    per_position = arch.layers * arch.hidden * LAYER_WORKING_BYTES

    def planned(positions: int, **optim) -> tuple[float, float]:
        config = DistillConfig(optim=OptimConfig(micro_batch_size=8, **optim))
        phases = plan(config, arch, positions, 1, None).phases
        return phases["training"]["activations (one micro-batch)"], phases["teacher"]["teacher hidden states"]

    assert planned(16_384) == (8 * 16_384 * per_position, 8 * 16_384 * arch.hidden * 4)
    assert planned(16_384, micro_batch_tokens=32_768) == (32_768 * per_position, 32_768 * arch.hidden * 4)
    assert planned(16_384, micro_batch_tokens=4_096) == (16_384 * per_position, 16_384 * arch.hidden * 4)


def test_a_vllm_share_that_cannot_hold_the_weights_is_refused(tmp_path, capsys, monkeypatch):
    """vLLM refuses to start when its share of the GPU is smaller than its weights and one sequence's cache:
    `--check` says so first, with the share that would do (Qwen3-8B: 15.3 GiB of bf16 weights; 0.15 × 80 GiB = 12)."""
    monkeypatch.chdir(ROOT)
    model = qwen3_8b_without_weights(tmp_path / "qwen3-8b")
    args = ["distill", "configs/tiny.yaml", f"model.name_or_path={model}", "sampling.max_new_tokens=16000",
            "optim.micro_batch_size=1", "optim.gradient_checkpointing=true", "run.parallel=fsdp",
            "sampling.engine=vllm", "sampling.sleep_mode=true", "--check", "--gpus", "8", "--gpu-gib", "80"]
    assert main([*args, "sampling.gpu_memory_utilization=0.3"]) == 0, capsys.readouterr().err
    assert main([*args, "sampling.gpu_memory_utilization=0.15"]) == 2
    err = capsys.readouterr().err
    assert "sampling.gpu_memory_utilization=0.15 gives vLLM 12.0 GiB of the 80 GiB GPU, less than its weights in " \
           "bf16 (15.3 GiB)" in err and "raise it to at least 0.2" in err
