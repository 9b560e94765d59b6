"""Checkpoints in Hugging Face format (safetensors + tokenizer), with what exact resume needs.

A checkpoint folder is written under a temporary name, flushed to disk and renamed into place, so a
reader never sees half a checkpoint and a crash while writing leaves the previous ones intact. LoRA
runs are saved merged: the folder loads with `AutoModelForCausalLM.from_pretrained` as is, like any
other. The weights are saved in the start model's dtype (`StartModel`): a bf16 model is trained on
float32 master weights, which go into training_state.pt only when they differ from the saved ones.
Next to the weights, training_state.pt holds what a run needs to continue exactly: the step, the
optimizer state, the skip counters, (LoRA) the adapters and those master weights; teacher.safetensors
holds a refresh or EMA teacher's snapshot. A frozen teacher (and LoRA's base) is the start model
itself: the checkpoint records its path and fingerprint instead of a copy, and a resumed run rebuilds
it from there, refusing when it changed. The data order and the sampling seeds are functions of
(seed, step), so they need no state. opsd_checkpoint.json lists the folder's files: pruning deletes
a checkpoint, or with `run.keep_weights` only its resume files, only when it holds nothing else.
Which checkpoint a run continues from: opsd/runtime/runs.py.

With `run.parallel=fsdp` every process takes part in a checkpoint: the weights are gathered
parameter by parameter into rank 0's CPU memory for the Hugging Face folder, and the trained tensors
(float32), the sharded optimizer state and a refresh/EMA teacher's sharded snapshot are written by
all processes with torch.distributed.checkpoint into sharded_state/, which loads re-sharded on any
number of processes (one included); training_state.pt then holds the counters only. A multi-node run
needs run.output_dir on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from opsd.core.errors import UserError, first_line
from opsd.core.models import BUILTIN_TINY, ModelConfig, causal_lm, local_path, merged_weights
from opsd.runtime import distributed
from opsd.runtime.faults import crash_point
from opsd.runtime.folders import (
    CHECKPOINT_INFO,
    CHECKPOINT_INFO_TMP,
    SHARDED_STATE,
    checkpoint_step,
    foreign_checkpoint,
    remove_partial_checkpoint,
)
from opsd.runtime.runs import TRAINING_STATE, RunConfig
from opsd.runtime.training import Progress

TEACHER_FILE = "teacher.safetensors"
# what only resuming needs; the training state first: without it
RESUME_FILES = (TRAINING_STATE, SHARDED_STATE, TEACHER_FILE)
# a folder is no resume point (runs.latest_checkpoint), so a prune cut short never leaves a half resume point


@dataclass(frozen=True)
class StartModel:
    """What a run's checkpoints need from the model it started from (built once, before any step)."""

    path: str  # model.name_or_path
    dtype: torch.dtype  # the checkpoints' weights are saved in it: the stored dtype, or the loaded one when narrower
    sha256: str  # fingerprint of what a resumed run rebuilds from it (frozen teacher, LoRA base); "" when nothing


def start_model(config: ModelConfig, model: nn.Module,
                frozen_teacher: dict[str, torch.Tensor] | None = None) -> StartModel:
    """The start model `config`, loaded as `model` before any step or restore. A resumed run takes
    from it, not from the checkpoint, LoRA's base weights (the frozen teacher too, with LoRA) and
    `frozen_teacher`, the snapshot of a frozen teacher (= the start model's weights): their
    fingerprint is recorded in every checkpoint, so that a resume from changed weights is refused."""
    loaded = causal_lm(model).dtype
    dtype = _stored_dtype(config) if loaded == torch.float32 else loaded
    rebuilt = {f"base/{n}": p for n, p in model.named_parameters() if not p.requires_grad}
    rebuilt.update({f"teacher/{n}": t for n, t in (frozen_teacher or {}).items()})
    return StartModel(config.name_or_path, dtype, fingerprint(rebuilt) if rebuilt else "")


def _stored_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype the start model's weights are stored in (its config.json); float32 for builtin:tiny
    and when it names none. Training upcasts them to float32 (models.resolve_dtype): saving that copy
    would double a bf16 model on disk without adding anything a user of the weights needs."""
    if config.name_or_path == BUILTIN_TINY:
        return torch.float32
    folder = local_path(config.name_or_path)
    stored = AutoConfig.from_pretrained(folder, trust_remote_code=config.trust_remote_code).dtype
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors`: equal exactly when all are
    bitwise equal. One pass over the weights (~1.5 GB/s on one core)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_due(step: int, steps: int, every: int) -> bool:
    """Checkpoint after the last step and every `every` steps (0: only the last)."""
    return step == steps or (every > 0 and step % every == 0)


def save_checkpoint(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, info: dict[str, Any],
    teacher_state: dict[str, torch.Tensor] | None = None, training_state: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None, sharded_state: dict[str, Any] | None = None,
) -> Path:
    """Write `folder` atomically: model (merged if LoRA; in `dtype`, None: as trained), tokenizer,
    opsd_checkpoint.json, the teacher's weight snapshot (teacher.safetensors, names as in
    `model.named_parameters()`) and the training state. Everything is flushed to disk before the rename.
    With `sharded_state` (run.parallel=fsdp) every process calls this: the weights are gathered to
    rank 0, which writes the files, and `sharded_state` goes to sharded_state/ from all processes."""
    weights = _gathered_state_dict(model) if sharded_state is not None and distributed.active() \
        else _merged_state_dict(model)
    rank0 = not distributed.active() or dist.get_rank() == 0
    tmp = folder.with_name(folder.name + ".tmp")
    if rank0:
        _write_files(model, tokenizer, tmp, info, weights, teacher_state, training_state, dtype)
    if sharded_state is not None:
        distributed.barrier_long()  # the folder exists before any process writes into it
        import torch.distributed.checkpoint as dcp

        with _single_process_quiet():
            dcp.save(sharded_state, checkpoint_id=tmp / SHARDED_STATE)
        distributed.barrier_long()
    if rank0:
        _finish(tmp, folder, info)
    return folder




def _write_files(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tmp: Path, info: dict[str, Any],
                 weights: dict[str, torch.Tensor], teacher_state: dict[str, torch.Tensor] | None,
                 training_state: dict[str, Any] | None, dtype: torch.dtype | None) -> None:
    if tmp.exists() or tmp.is_symlink():
        remove_partial_checkpoint(tmp)
    tmp.mkdir(parents=True)
    # written first, so that an interrupted write is recognisable as ours (and only then deleted)
    (tmp / CHECKPOINT_INFO).write_text(json.dumps({**info, "partial": True}), encoding="utf-8")
    base = causal_lm(model)
    base.save_pretrained(tmp, state_dict=_cast(weights, dtype), safe_serialization=True)
    if dtype is not None:  # save_pretrained writes the dtype of the live (float32) weights
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(tmp)
    if teacher_state:
        save_file(teacher_state, str(tmp / TEACHER_FILE))
    if training_state is not None:
        torch.save(training_state, tmp / TRAINING_STATE)


def _finish(tmp: Path, folder: Path, info: dict[str, Any]) -> None:
    """List the files, flush them, and rename `tmp` into `folder`."""
    files = sorted(p.name for p in tmp.iterdir() if p.name != CHECKPOINT_INFO)  # what a later prune may delete
    (tmp / CHECKPOINT_INFO).write_text(json.dumps({**info, "files": files}, indent=2), encoding="utf-8")
    crash_point("checkpoint")
    for path in tmp.iterdir():
        _fsync(path)
    if folder.exists():  # a step redone after a crash: replace our own checkpoint of it, nothing else
        foreign = foreign_checkpoint(folder)
        if foreign is not None:
            raise UserError(f"checkpoint folder {folder} holds {foreign.name}, which opsd did not write; nothing was "
                            "replaced")
        shutil.rmtree(folder)
    tmp.rename(folder)
    _fsync(folder.parent)


def save_run_checkpoint(run_dir: Path | None, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                        optimizer: torch.optim.Optimizer, progress: Progress, info: dict[str, Any],
                        run: RunConfig, start: StartModel,
                        teacher_state: dict[str, torch.Tensor] | None = None) -> Path:
    """The checkpoint of step `progress.step` with all a run needs to continue (weights in the
    start model's dtype); then older checkpoints are pruned (`run.keep_last`, `run.keep_weights`).
    Under FSDP every process calls it, `run_dir` None but on rank 0."""
    step = progress.step
    record = {"start_model": {"path": start.path, "sha256": start.sha256}} if start.sha256 else {}
    folder = Path(run.output_dir) / "checkpoints" / f"step_{step:06d}"
    if run.parallel == "fsdp":
        stepped = bool(optimizer.state)  # AdamW has state once it has stepped (the same on every process)
        save_checkpoint(model, tokenizer, folder, {"step": step, **info, **record},
                        training_state={**progress.state(), "sharded": True, "optimizer_stepped": stepped},
                        dtype=start.dtype,
                        sharded_state=sharded_state(model, optimizer, teacher_state or {}, stepped))
    else:
        save_checkpoint(model, tokenizer, folder, {"step": step, **info, **record}, teacher_state,
                        training_state(model, optimizer, progress, start.dtype), start.dtype)
    if run_dir is not None:
        prune_checkpoints(run_dir, run.keep_last, run.keep_weights)
    return folder


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, teacher_state: dict[str, torch.Tensor],
                  stepped: bool) -> dict[str, Any]:
    """What sharded_state/ holds (run.parallel=fsdp), as views of the live tensors, so that
    torch.distributed.checkpoint saves them and loads into them in place: the trained parameters,
    the optimizer state by parameter name (when the optimizer has `stepped`: torch builds the state
    of one that has not by a step with zero gradients, which would change its step count), the
    teacher's snapshot."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"trained": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": get_optimizer_state_dict(model, optimizer) if stepped else {}, "teacher": dict(teacher_state)}


def stop_reason(progress: Progress, run: RunConfig, max_skipped_in_a_row: int, why_empty: str = "") -> str:
    """Why the run stops after this step ("" to go on): `max_skipped_in_a_row` non-finite steps in a
    row (optim.max_skipped_in_a_row), or `run.max_empty_steps_in_a_row` steps with nothing to train on
    (`why_empty` says why)."""
    step = progress.step
    if progress.empty_in_a_row >= run.max_empty_steps_in_a_row:
        return (f"training stopped after step {step}: {progress.empty_in_a_row} steps in a row had nothing to train "
                f"on ({why_empty}; run.max_empty_steps_in_a_row={run.max_empty_steps_in_a_row}); the weights are "
                "unchanged since the last step that trained")
    if progress.skipped_in_a_row >= max_skipped_in_a_row:
        return (f"training stopped after step {step}: {progress.skipped_in_a_row} steps in a row had a non-finite "
                f"loss or gradient (try a lower optim.lr); the last good weights are in "
                f"{run.output_dir}/checkpoints/step_{step:06d}")
    return ""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_weights: bool = False) -> None:
    """Of all but the `keep_last` checkpoints (step_N folders) of the highest steps (0 keeps all),
    delete the folder, or with `keep_weights` only its resume files: what stays is a Hugging Face
    folder that a later stage or `opsd eval` loads and a resume never picks. One holding a file opsd
    did not write (or written by an opsd that did not list its files) is kept, with a warning: opsd
    deletes only what it wrote. Other names are never touched."""
    folders = sorted((f for f in (run_dir / "checkpoints").iterdir() if checkpoint_step(f) is not None),
                     key=checkpoint_step)
    for folder in folders[:-keep_last] if keep_last > 0 else []:
        foreign = foreign_checkpoint(folder)
        if foreign is not None:
            print(f"opsd: warning: kept {folder} past run.keep_last: opsd did not write {foreign.name} (or it "
                  "predates opsd's file lists)", file=sys.stderr)
        elif not keep_weights:
            shutil.rmtree(folder)
        elif any((folder / name).exists() for name in RESUME_FILES):
            _drop_resume_files(folder)


def _drop_resume_files(folder: Path) -> None:
    """Delete the training state and teacher snapshot of checkpoint `folder` and take them off its
    file list (written aside and renamed), so the list keeps naming exactly what opsd wrote there."""
    for name in RESUME_FILES:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            shutil.rmtree(folder / name)
        else:
            (folder / name).unlink(missing_ok=True)
    info = _read_info(folder)  # readable: foreign_checkpoint checked it
    info["files"] = [name for name in info.get("files", []) if name not in RESUME_FILES]
    (folder / CHECKPOINT_INFO_TMP).write_text(json.dumps(info, indent=2), encoding="utf-8")
    (folder / CHECKPOINT_INFO_TMP).replace(folder / CHECKPOINT_INFO)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                   weights_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What training_state.pt holds: `progress` (step and counters), the optimizer state, for LoRA
    runs (whose saved weights are merged) the adapters themselves, and, when the weights are saved in
    `weights_dtype` other than the trained one (a bf16 model trained on float32), the trained
    weights: continuing from the rounded ones would not be the same run."""
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if _is_peft(model):
        return {**progress.state(), "optimizer": optimizer.state_dict(), "adapters": trained}
    state = {**progress.state(), "optimizer": optimizer.state_dict(), "adapters": {}}
    if weights_dtype is not None and any(p.dtype != weights_dtype for p in trained.values()):
        state["master_weights"] = trained
    return state


def _load_state(checkpoint: Path, device) -> dict[str, Any]:
    """training_state.pt through torch's tensors-only unpickler: a crafted file cannot run code."""
    try:
        return torch.load(checkpoint / TRAINING_STATE, map_location=device, weights_only=True)
    except Exception as err:  # UnpicklingError for anything but tensors and plain containers, EOFError, …
        message = first_line(err)
        raise UserError(f"checkpoint {checkpoint} has an unreadable {TRAINING_STATE} ({message})") from None


def restore(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, start: StartModel,
            teacher=None) -> Progress:
    """Load weights, optimizer state and teacher snapshot of `checkpoint` into a run freshly built
    from `start`, after checking that what it rebuilds from `start` is what the run had; return its
    progress (step and counters). The state file is read with the tensors-only loader."""
    recorded = _read_info(checkpoint).get("start_model")
    if isinstance(recorded, dict) and recorded.get("sha256") != start.sha256:
        raise UserError(f"{checkpoint} cannot be resumed: its run takes weights it never saved (a frozen teacher, "
                        f"LoRA's base) from the start model {recorded.get('path')}, which has changed since "
                        f"(sha256 {str(recorded.get('sha256'))[:12]} then, {start.sha256[:12]} now); put that model "
                        "back or start a new run (run.overwrite=true)")
    device = next(model.parameters()).device
    state = _load_state(checkpoint, device)
    if state.get("sharded"):
        _load_sharded(checkpoint, model, optimizer, teacher, state.get("optimizer_stepped", True))
        return Progress.from_state(state)
    if _is_peft(model):
        _copy_into(model, state["adapters"], checkpoint)
    elif "master_weights" in state:  # the weights were saved rounded to the start model's dtype
        _copy_into(model, state["master_weights"], checkpoint)
    else:
        _load_weights(causal_lm(model), checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    if teacher is not None and (checkpoint / TEACHER_FILE).is_file():
        teacher.load_state_dict(load_file(str(checkpoint / TEACHER_FILE), device=str(device)))
    return Progress.from_state(state)


def _load_sharded(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, teacher,
                  stepped: bool) -> None:
    """sharded_state/ into this run's tensors, re-sharded to however many processes run now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not (checkpoint / SHARDED_STATE).is_dir():
        raise UserError(f"checkpoint {checkpoint} has no {SHARDED_STATE}/ (written with run.parallel=fsdp); "
                        "resume it with that setting or start a new run")
    state = sharded_state(model, optimizer, teacher.checkpoint_state() if teacher is not None else {}, stepped)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=checkpoint / SHARDED_STATE)
    except Exception as err:  # a missing or mis-shaped tensor: DCP's CheckpointException lists every rank's
        message = first_line(err)
        raise UserError(f"checkpoint {checkpoint} does not match the model ({message[:300]})") from None
    if stepped:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextlib.contextmanager
def _single_process_quiet():
    """torch.distributed.checkpoint warns, at every save and load in one process, that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def _read_info(checkpoint: Path) -> dict[str, Any]:
    try:
        info = json.loads((checkpoint / CHECKPOINT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@torch.no_grad()
def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Copy saved trained tensors (adapters, master weights) into the parameters of the same names."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if tensors.keys() != params.keys():
        name = sorted(tensors.keys() ^ params.keys())[0]
        raise UserError(f"checkpoint {checkpoint} does not match the model "
                        f"({name} is {'unexpected' if name in tensors else 'missing'})")
    for name, value in tensors.items():
        params[name].copy_(value)


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


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`state` with its floating tensors in `dtype` (None: unchanged). Tied tensors (one storage
    under two names) stay one tensor, which save_pretrained writes once."""
    if dtype is None:
        return state
    cast: dict[tuple, torch.Tensor] = {}
    key = lambda value: (value.data_ptr(), value.dtype, value.shape, value.stride())
    for value in state.values():
        if key(value) not in cast:
            cast[key(value)] = value.to(dtype) if value.is_floating_point() else value
    return {name: cast[key(value)] for name, value in state.items()}


@torch.no_grad()
def _gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Under FSDP: the weights whole in rank 0's CPU memory, gathered one parameter at a time (every
    process takes part; the others get an empty dict); LoRA merged as in `_merged_state_dict`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    base = causal_lm(model)
    state = get_model_state_dict(base, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return state
    tied: dict[int, str] = {}  # one tensor under every name of a tied parameter, as save_pretrained expects
    for name, param in base.named_parameters(remove_duplicate=False):
        first = tied.setdefault(id(param), name)
        if first != name and first in state:
            state[name] = state[first]
    if not _is_peft(model):
        return state
    from peft.tuners.lora import Linear as LoraLinear

    for name, module in base.named_modules():  # linear layers only: other LoRA layers are refused up front
        if isinstance(module, LoraLinear):
            key = f"{name}.base_layer.weight"
            for adapter in module.active_adapters:
                b, a = state[f"{name}.lora_B.{adapter}.weight"], state[f"{name}.lora_A.{adapter}.weight"]
                delta = b.float() @ a.float()
                delta = (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]
                state[key] = state[key] + delta.to(state[key].dtype)
    return {key.replace(".base_layer.", "."): value for key, value in state.items() if "lora_" not in key}


def _merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights and buffers, LoRA merged (`models.merged_weights`)."""
    return merged_weights(model, causal_lm(model).state_dict())
