"""Run folders and checkpoints in Hugging Face format (safetensors + tokenizer).

A checkpoint folder is written under a temporary name and renamed into place, so a reader never
sees half a checkpoint. LoRA runs are saved merged: the folder loads with
`AutoModelForCausalLM.from_pretrained` as is, like any other.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from opsd.errors import UserError
from opsd.models import causal_lm


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Check that the run folder can be written before any work starts; create it only then."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output folder {run_dir} is a file")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {run_dir} already holds files; choose another run.output_dir or set run.overwrite=true")
        shutil.rmtree(run_dir)
    parent = run_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {run_dir} cannot be written ({err.strerror})") from None
    return run_dir


def open_run_dir(config: Any, rank: int) -> Path | None:
    """Rank 0 creates the run folder of a stage config (with `run.output_dir`/`run.overwrite`) and saves
    the resolved config in it; other ranks write nothing and get None."""
    if rank != 0:
        return None
    run_dir = prepare_run_dir(config.run.output_dir, config.run.overwrite)
    save_config(run_dir, dataclasses.asdict(config))
    return run_dir


def checkpoint_due(step: int, steps: int, every: int) -> bool:
    """Checkpoint after the last step and every `every` steps (0: only the last)."""
    return step == steps or (every > 0 and step % every == 0)


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def save_checkpoint(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, info: dict[str, Any],
    teacher_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `folder` atomically: model (merged if LoRA), tokenizer, opsd_checkpoint.json and the
    teacher's weight snapshot (teacher.safetensors, names as in `model.named_parameters()`)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    base = causal_lm(model)
    base.save_pretrained(tmp, state_dict=_merged_state_dict(model), safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if teacher_state:
        save_file(teacher_state, str(tmp / "teacher.safetensors"))
    (tmp / "opsd_checkpoint.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


@torch.no_grad()
def _merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights; for a PEFT model, base weights plus each adapter's delta, built out
    of place: merging into the live weights and back would not restore them exactly in low precision,
    and the frozen teacher of a LoRA run *is* those base weights."""
    base = causal_lm(model)
    state = base.state_dict()
    if not hasattr(model, "get_base_model"):
        return state
    from peft.tuners.lora import LoraLayer

    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            key = f"{name}.base_layer.weight"
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
            state[key] = state[key] + delta.to(state[key].dtype)
    return {key.replace(".base_layer.", "."): value for key, value in state.items() if "lora_" not in key}
