"""Checkpoints in Hugging Face format (safetensors + tokenizer), with what exact resume needs.

A checkpoint folder is written under a temporary name, flushed to disk and renamed into place, so a
reader never sees half a checkpoint and a crash while writing leaves the previous ones intact. LoRA
runs are saved merged: the folder loads with `AutoModelForCausalLM.from_pretrained` as is, like any
other. Next to the weights, training_state.pt holds what a run needs to continue exactly: the step,
the optimizer state, the skip counters and (LoRA) the adapters; teacher.safetensors holds the
teacher's weight snapshot. The data order and the sampling seeds are functions of (seed, step),
so they need no state. opsd_checkpoint.json lists the folder's files: pruning deletes a checkpoint
only when it holds nothing else. Which checkpoint a run continues from: opsd/runs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from opsd.errors import UserError
from opsd.faults import crash_point
from opsd.folders import CHECKPOINT_INFO, checkpoint_step, foreign_checkpoint, remove_partial_checkpoint
from opsd.models import causal_lm
from opsd.runs import TRAINING_STATE, RunConfig
from opsd.training import new_progress



def checkpoint_due(step: int, steps: int, every: int) -> bool:
    """Checkpoint after the last step and every `every` steps (0: only the last)."""
    return step == steps or (every > 0 and step % every == 0)


def save_checkpoint(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, info: dict[str, Any],
    teacher_state: dict[str, torch.Tensor] | None = None, training_state: dict[str, Any] | None = None,
) -> Path:
    """Write `folder` atomically: model (merged if LoRA), tokenizer, opsd_checkpoint.json, the
    teacher's weight snapshot (teacher.safetensors, names as in `model.named_parameters()`) and the
    training state. Everything is flushed to disk before the rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists() or tmp.is_symlink():
        remove_partial_checkpoint(tmp)
    tmp.mkdir(parents=True)
    # written first, so that an interrupted write is recognisable as ours (and only then deleted)
    (tmp / CHECKPOINT_INFO).write_text(json.dumps({**info, "partial": True}), encoding="utf-8")
    base = causal_lm(model)
    base.save_pretrained(tmp, state_dict=_merged_state_dict(model), safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if teacher_state:
        save_file(teacher_state, str(tmp / "teacher.safetensors"))
    if training_state is not None:
        torch.save(training_state, tmp / TRAINING_STATE)
    files = sorted(p.name for p in tmp.iterdir() if p.name != CHECKPOINT_INFO)  # what a later prune may delete
    (tmp / CHECKPOINT_INFO).write_text(json.dumps({**info, "files": files}, indent=2), encoding="utf-8")
    crash_point("checkpoint")
    for path in tmp.iterdir():
        _fsync(path)
    if folder.exists():  # a step redone after a crash: replace our own checkpoint of it, nothing else
        foreign = foreign_checkpoint(folder)
        if foreign is not None:
            raise UserError(f"checkpoint folder {folder} holds {foreign.name}, which opsd did not write; nothing was replaced")
        shutil.rmtree(folder)
    tmp.rename(folder)
    _fsync(folder.parent)
    return folder


def save_run_checkpoint(run_dir: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                        optimizer: torch.optim.Optimizer, progress: dict[str, int], info: dict[str, Any],
                        keep_last: int, teacher_state: dict[str, torch.Tensor] | None = None) -> Path:
    """The checkpoint of step `progress["step"]` with all a run needs to continue; then all but the
    `keep_last` latest checkpoints are deleted (0 keeps all)."""
    step = progress["step"]
    folder = save_checkpoint(model, tokenizer, run_dir / "checkpoints" / f"step_{step:06d}", {"step": step, **info},
                             teacher_state, training_state(model, optimizer, progress))
    prune_checkpoints(run_dir, keep_last)
    return folder


def checkpoint_or_stop(run_dir: Path | None, run: RunConfig, max_skipped_in_a_row: int, model: nn.Module,
                       tokenizer: PreTrainedTokenizerBase, optimizer: torch.optim.Optimizer, progress: dict[str, int],
                       stage: str, teacher_state: dict[str, torch.Tensor] | None = None, why_empty: str = "") -> None:
    """After a step: its checkpoint when due (rank 0), and a checkpoint and a stop when
    `max_skipped_in_a_row` non-finite steps in a row (optim.max_skipped_in_a_row) or
    `run.max_empty_steps_in_a_row` steps with nothing to train on (`why_empty` says why) have passed."""
    crash_point("step")
    empty = progress["empty_in_a_row"] >= run.max_empty_steps_in_a_row
    stop = progress["skipped_in_a_row"] >= max_skipped_in_a_row or empty
    step = progress["step"]
    if run_dir is not None and (stop or checkpoint_due(step, run.steps, run.save_every)):
        save_run_checkpoint(run_dir, model, tokenizer, optimizer, progress, {"stage": stage}, run.keep_last,
                            teacher_state)
    if empty:
        raise UserError(f"training stopped after step {step}: {progress['empty_in_a_row']} steps in a row had nothing "
                        f"to train on ({why_empty}; run.max_empty_steps_in_a_row={run.max_empty_steps_in_a_row}); "
                        f"the weights are unchanged since the last step that trained")
    if stop:
        raise UserError(f"training stopped after step {step}: {progress['skipped_in_a_row']} steps in a row had a "
                        f"non-finite loss or gradient (try a lower optim.lr); the last good weights are in "
                        f"{run.output_dir}/checkpoints/step_{step:06d}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the `keep_last` checkpoints (step_N folders) of the highest steps (0 keeps
    all). One holding a file opsd did not write (or written by an opsd that did not list its files)
    is kept, with a warning: opsd deletes only what it wrote. Other names are never touched."""
    folders = sorted((f for f in (run_dir / "checkpoints").iterdir() if checkpoint_step(f) is not None),
                     key=checkpoint_step)
    for folder in folders[:-keep_last] if keep_last > 0 else []:
        foreign = foreign_checkpoint(folder)
        if foreign is None:
            shutil.rmtree(folder)
        else:
            print(f"opsd: warning: kept {folder} past run.keep_last: opsd did not write {foreign.name} (or it "
                  "predates opsd's file lists)", file=sys.stderr)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, int]) -> dict[str, Any]:
    """What training_state.pt holds: `progress` (step and counters), the optimizer state and, for
    LoRA runs (whose saved weights are merged), the adapters themselves."""
    adapters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad} if _is_peft(model) else {}
    return {**progress, "optimizer": optimizer.state_dict(), "adapters": adapters}


def _load_state(checkpoint: Path, device) -> dict[str, Any]:
    """training_state.pt through torch's tensors-only unpickler: a crafted file cannot run code."""
    try:
        return torch.load(checkpoint / TRAINING_STATE, map_location=device, weights_only=True)
    except Exception as err:  # UnpicklingError for anything but tensors and plain containers, EOFError, …
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {checkpoint} has an unreadable {TRAINING_STATE} ({message})") from None


def restore(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, teacher=None) -> dict[str, int]:
    """Load weights, optimizer state and teacher snapshot of `checkpoint` into a freshly built run;
    return its progress (step and counters). The state file is read with the tensors-only loader."""
    device = next(model.parameters()).device
    state = _load_state(checkpoint, device)
    with torch.no_grad():
        if _is_peft(model):
            params = dict(model.named_parameters())
            for name, value in state["adapters"].items():
                params[name].copy_(value)
        else:
            _load_weights(causal_lm(model), checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    if teacher is not None and (checkpoint / "teacher.safetensors").is_file():
        teacher.load_state_dict(load_file(str(checkpoint / "teacher.safetensors"), device=str(device)))
    # counters a checkpoint of an earlier version does not hold start from zero
    return {**new_progress(), **{k: v for k, v in state.items() if k not in ("optimizer", "adapters")}}


@torch.no_grad()
def _load_weights(model: nn.Module, checkpoint: Path) -> None:
    device = next(model.parameters()).device
    tensors = {}
    for path in sorted(checkpoint.glob("model*.safetensors")):
        tensors.update(load_file(str(path), device=str(device)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    own = model.state_dict()
    loaded_storage = {own[k].data_ptr() for k in tensors if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded_storage]
    if unexpected or untied:
        raise UserError(f"checkpoint {checkpoint} does not match the model "
                        f"({(unexpected or untied)[0]} is {'unexpected' if unexpected else 'missing'})")


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "get_base_model")


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
