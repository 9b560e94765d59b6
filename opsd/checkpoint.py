"""Run folders and checkpoints in Hugging Face format (safetensors + tokenizer), and exact resume.

A checkpoint folder is written under a temporary name, flushed to disk and renamed into place, so a
reader never sees half a checkpoint and a crash while writing leaves the previous ones intact. LoRA
runs are saved merged: the folder loads with `AutoModelForCausalLM.from_pretrained` as is, like any
other. Next to the weights, training_state.pt holds what a run needs to continue exactly: the step,
the optimizer state, the skip counters and (LoRA) the adapters; teacher.safetensors holds the
teacher's weight snapshot. The data order and the sampling generator are functions of (seed, step),
so they need no state. A run started again on a folder holding a run of the same config continues
from its latest checkpoint; metrics.jsonl is cut back to that step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from opsd.errors import UserError
from opsd.faults import crash_point
from opsd.models import causal_lm

TRAINING_STATE = "training_state.pt"
# run options that may change between a run and its resumption; any other difference is refused
CHANGEABLE_ON_RESUME = ("run.steps", "run.save_every", "run.keep_last", "run.tensorboard", "run.resume",
                        "run.overwrite", "run.grader_timeout_s")


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


def open_run_dir(config: Any, rank: int, resumed_step: int) -> Path | None:
    """Rank 0 creates the run folder of a stage config (with `run.output_dir`/`run.overwrite`) and saves
    the resolved config in it; other ranks write nothing and get None. A folder holding a run of the
    same config is continued: its metrics are cut back to `resumed_step` (0: a fresh start)."""
    if rank != 0:
        return None
    run_dir = Path(config.run.output_dir)
    if _holds_run(run_dir) and not config.run.overwrite:
        for leftover in (run_dir / "checkpoints").glob("*.tmp"):
            shutil.rmtree(leftover)
        trim_metrics(run_dir, resumed_step)
    else:
        run_dir = prepare_run_dir(run_dir, config.run.overwrite)
    save_config(run_dir, dataclasses.asdict(config))
    return run_dir


def resume_point(config: Any) -> Path | None:
    """The checkpoint a run continues from: the latest complete one of a folder holding a run of
    the same config, None for a fresh run. `run.resume=true` insists that there is one."""
    run_dir = Path(config.run.output_dir)
    if config.run.overwrite or not _holds_run(run_dir):
        if config.run.resume:
            raise UserError(f"run.resume: {run_dir} holds no run to resume")
        return None
    check_same_config(run_dir, dataclasses.asdict(config), CHANGEABLE_ON_RESUME)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None and config.run.resume:
        raise UserError(f"run.resume: {run_dir} holds no complete checkpoint to resume from")
    return checkpoint


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file()


def check_same_config(run_dir: Path, config: dict[str, Any], changeable: tuple[str, ...]) -> None:
    """Refuse to continue the run in `run_dir` under a config that differs in other keys than `changeable`."""
    try:
        saved = _flatten(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, AttributeError):
        raise UserError(f"{run_dir / 'config.yaml'} is not the config of an opsd run") from None
    current = _flatten(yaml.safe_load(yaml.safe_dump(config)))
    differ = [k for k in sorted(saved.keys() | current.keys()) if k not in changeable and saved.get(k) != current.get(k)]
    if differ:
        key = differ[0]
        raise UserError(f"output folder {run_dir} holds a run of another config ({key} is {saved.get(key)!r} there, "
                        f"{current.get(key)!r} here); choose another run.output_dir or set run.overwrite=true")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint (one with a training state) of the highest step, or None."""
    folders = [f for f in (run_dir / "checkpoints").glob("step_*")
               if not f.name.endswith(".tmp") and (f / TRAINING_STATE).is_file()]
    return max(folders, key=lambda f: int(f.name.split("_")[1]), default=None)


def trim_metrics(run_dir: Path, step: int) -> None:
    """Keep the metrics rows of steps 1..`step` (a row cut short by a crash is dropped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


def checkpoint_due(step: int, steps: int, every: int) -> bool:
    """Checkpoint after the last step and every `every` steps (0: only the last)."""
    return step == steps or (every > 0 and step % every == 0)


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def save_checkpoint(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, info: dict[str, Any],
    teacher_state: dict[str, torch.Tensor] | None = None, training_state: dict[str, Any] | None = None,
) -> Path:
    """Write `folder` atomically: model (merged if LoRA), tokenizer, opsd_checkpoint.json, the
    teacher's weight snapshot (teacher.safetensors, names as in `model.named_parameters()`) and the
    training state. Everything is flushed to disk before the rename."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    base = causal_lm(model)
    base.save_pretrained(tmp, state_dict=_merged_state_dict(model), safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if teacher_state:
        save_file(teacher_state, str(tmp / "teacher.safetensors"))
    if training_state is not None:
        torch.save(training_state, tmp / TRAINING_STATE)
    (tmp / "opsd_checkpoint.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    crash_point("checkpoint")
    for path in tmp.iterdir():
        _fsync(path)
    if folder.exists():
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


def checkpoint_or_stop(run_dir: Path | None, config: Any, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                       optimizer: torch.optim.Optimizer, progress: dict[str, int], stage: str,
                       teacher_state: dict[str, torch.Tensor] | None = None) -> None:
    """After a step: its checkpoint when due (rank 0), and when `optim.max_skipped_in_a_row`
    non-finite steps in a row have passed, a checkpoint of the last good weights and a stop."""
    crash_point("step")
    stop = progress["skipped_in_a_row"] >= config.optim.max_skipped_in_a_row
    step = progress["step"]
    if run_dir is not None and (stop or checkpoint_due(step, config.run.steps, config.run.save_every)):
        save_run_checkpoint(run_dir, model, tokenizer, optimizer, progress, {"stage": stage}, config.run.keep_last,
                            teacher_state)
    if stop:
        raise UserError(f"training stopped after step {step}: {progress['skipped_in_a_row']} steps in a row had a "
                        f"non-finite loss or gradient (try a lower optim.lr); the last good weights are in "
                        f"{config.run.output_dir}/checkpoints/step_{step:06d}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the `keep_last` checkpoints of the highest steps (0 keeps all)."""
    folders = sorted((f for f in (run_dir / "checkpoints").glob("step_*") if not f.name.endswith(".tmp")),
                     key=lambda f: int(f.name.split("_")[1]))
    for folder in folders[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(folder)


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
    return {k: v for k, v in state.items() if k not in ("optimizer", "adapters")}


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
