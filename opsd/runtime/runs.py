"""The run contract shared by every training stage and the pipeline: `RunConfig`, the run folder,
and continuing a run that stopped.

A stage (sft, rlvr, distill) or a pipeline holds a `run: RunConfig` (composition) and gets its run
folder from `open_run_dir`. A folder holding a run of the same config is continued from its latest
checkpoint (`resume_point`); `run.resume=true` insists that there is one, `run.overwrite=true`
replaces an opsd folder instead (and refuses any folder holding something opsd did not write).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from opsd.core.config import build, to_dict
from opsd.core.errors import UserError, require
from opsd.runtime.distributed import Parallel
from opsd.runtime.folders import (
    MARKER,
    Kind,
    checkpoint_step,
    mark,
    remove_own,
    remove_partial_checkpoint,
)
from opsd.runtime.tracking import check_trackers

TRAINING_STATE = "training_state.pt"
# run options that may change between a run and its resumption; any other difference is refused
# (run.tensorboard: the older spelling of run.report_to, in the config.yaml of runs begun before it)
CHANGEABLE_ON_RESUME = ("run.steps", "run.save_every", "run.keep_last", "run.keep_weights", "run.report_to",
                        "run.tensorboard", "run.threads",
                        "run.resume", "run.overwrite", "run.collective_timeout_min", "verifier.timeout_s")


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/run"  # run folder: config.yaml, metrics.jsonl, checkpoints/ (a pipeline: one per stage)
    overwrite: bool = False  # replace an existing opsd folder (never one holding files opsd did not write)
    resume: bool = False  # insist on continuing the run in output_dir (it continues anyway when there is one)
    steps: int = 100  # optimizer steps (a pipeline: set per stage)
    problems_per_step: int = 32  # problems per optimizer step (sft: problem/response pairs) (a pipeline: per stage)
    save_every: int = 0  # checkpoint every k steps (0: only at the end) (a pipeline: per stage)
    keep_last: int = 3  # checkpoints kept (the latest ones; 0 keeps all) (a pipeline: per stage)
    keep_weights: bool = False  # past keep_last, delete only resume files (training state, teacher), keep weights +
    #   tokenizer (a pipeline: per stage)
    seed: int = 0  # data order, sampling and initialisation (a pipeline: per stage)
    max_empty_steps_in_a_row: int = 5  # stop (exit 2) after this many steps with nothing to train on (a pipeline: per
    #   stage)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (a pipeline: given to every stage and evaluation)
    report_to: tuple[str, ...] | str = ("tensorboard",)  # trackers besides metrics.jsonl: tensorboard (when
    #   installed), wandb, trackio; [] or none: no tracker (a pipeline: every stage, when not the default)
    threads: int | None = None  # torch CPU threads; null: torch's choice (one per core); 1-2 on a busy CPU (a
    #   pipeline: every stage)
    parallel: Parallel = "ddp"  # several processes (torchrun): ddp = whole model per process; fsdp = weights,
    #   gradients and optimizer state sharded (FSDP2) (a pipeline: every stage)
    fsdp_offload: bool = False  # run.parallel=fsdp on GPU: keep the shards (weights, gradients, optimizer state) in
    #   CPU memory (a pipeline: every stage)
    collective_timeout_min: float = 60.0  # several processes: how long one waits for the others in a collective
    #   before the job fails (NCCL's 10 is shorter than long rollouts take to differ); a heartbeat line every 5 min
    #   names the processes waited for (a pipeline: every stage)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # run.report_to=wandb reads as [wandb]; none as []
            object.__setattr__(self, "report_to", () if self.report_to in ("none", "") else (self.report_to,))


def check_run(run: RunConfig, world: int, per_step: str = "run.problems_per_step") -> None:
    check_trackers(run.report_to)
    require(
        ("run.steps", run.steps >= 1, "at least 1"),
        (per_step, run.problems_per_step >= world, f"at least the number of processes ({world})"),
        ("run.save_every", run.save_every >= 0, "non-negative"),
        ("run.keep_last", run.keep_last >= 0, "non-negative"),
        ("run.max_empty_steps_in_a_row", run.max_empty_steps_in_a_row >= 1, "at least 1"),
        ("run.fsdp_offload", not run.fsdp_offload or run.parallel == "fsdp", "false unless run.parallel=fsdp"),
        ("run.collective_timeout_min", run.collective_timeout_min > 0, "positive"),
    )


def use_threads(threads: int | None, option: str = "run.threads") -> None:
    """Give torch `threads` CPU threads for the rest of the process (None: leave torch's choice).
    Every command calls it before its work: on a CPU busy with other work, torch's OpenMP threads
    spin against it and slow every step many times over."""
    if threads is None:
        return
    require((option, threads >= 1, "at least 1 (or null: torch's choice)"))
    torch.set_num_threads(threads)


def prepare_run_dir(path: str | Path, overwrite: bool, kind: Kind = "run", option: str = "run.overwrite",
                    deleting_for: str = "") -> Path:
    """Check that the folder can be written before any work starts; create it (with its opsd marker)
    only then. An existing non-empty folder is replaced only with `overwrite` (`option`, or what
    `deleting_for` names) and only when opsd wrote all of it."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output folder {run_dir} is a file")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {run_dir} already holds files; choose another output folder or set "
                            f"{option}=true")
        remove_own(run_dir, deleting_for or f"{option}=true", kind)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        mark(run_dir, kind)
    except OSError as err:
        raise UserError(f"output folder {run_dir} cannot be written ({err.strerror})") from None
    return run_dir


def open_run_dir(run: RunConfig, config: dict[str, Any], rank: int, resumed_step: int) -> Path | None:
    """Rank 0 creates the run folder and saves the resolved stage `config` in it; other ranks write
    nothing and get None. A folder holding a run of the same config is continued: its metrics are
    cut back to `resumed_step` (0: a fresh start)."""
    if rank != 0:
        return None
    run_dir = Path(run.output_dir)
    if holds_run(run_dir) and not run.overwrite:
        for leftover in (run_dir / "checkpoints").glob("step_*.tmp"):
            remove_partial_checkpoint(leftover)
        trim_metrics(run_dir, resumed_step)
    else:
        run_dir = prepare_run_dir(run_dir, run.overwrite)
    save_config(run_dir, config)
    return run_dir


def resume_point(run: RunConfig, config: dict[str, Any], cls: type | None = None) -> Path | None:
    """The checkpoint a run continues from: the latest complete one of a folder holding a run of
    the same resolved stage `config` (of class `cls`, through which the saved one is read, so that
    keys added since compare as their defaults), None for a fresh run. `run.resume=true` insists
    that there is one."""
    run_dir = Path(run.output_dir)
    if run.overwrite or not holds_run(run_dir):
        if run.resume:
            raise UserError(f"run.resume: {run_dir} holds no run to resume")
        return None
    check_same_config(run_dir, config, CHANGEABLE_ON_RESUME, cls)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None and run.resume:
        raise UserError(f"run.resume: {run_dir} holds no complete checkpoint to resume from")
    return checkpoint


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file()


def check_same_config(run_dir: Path, config: dict[str, Any], changeable: tuple[str, ...],
                      cls: type | None = None) -> None:
    """Refuse to continue the run in `run_dir` under a config that differs in other keys than `changeable`
    (or one written by an opsd without folder markers, whose keys and sampling differ). With `cls`
    (the config's class) the saved config is read through it first, so that a key added since it was
    written compares as its default (a pipeline's stages are a list, whose items lack such keys)."""
    if not (run_dir / MARKER).is_file():
        raise UserError(f"output folder {run_dir} holds a run of an earlier opsd version (no {MARKER}), which this "
                        "version neither continues nor replaces; choose another output folder")
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        saved = _flatten(raw)
    except (yaml.YAMLError, AttributeError):
        raise UserError(f"{run_dir / 'config.yaml'} is not the config of an opsd run") from None
    if cls is not None:
        try:
            saved = _flatten(yaml.safe_load(yaml.safe_dump(to_dict(build(cls, _without(raw, changeable), prefix="")))))
        except UserError:
            pass  # compared as written: the first difference is named below
    current = _flatten(yaml.safe_load(yaml.safe_dump(config)))
    differ = [k for k in sorted(saved.keys() | current.keys())
              if k not in changeable and saved.get(k) != current.get(k)]
    if differ:
        key = differ[0]
        raise UserError(f"output folder {run_dir} holds a run of another config ({key} is {saved.get(key)!r} there, "
                        f"{current.get(key)!r} here); choose another run.output_dir or set run.overwrite=true")


def _without(tree: dict[str, Any], keys: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """`tree` less the dotted `keys` (whose values may differ, or may be spelt as an older version did)."""
    return {key: _without(value, keys, f"{prefix}{key}.") if isinstance(value, dict) else value
            for key, value in tree.items() if f"{prefix}{key}" not in keys}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint (a step_N folder with a training state) of the highest step, or None."""
    folders = [f for f in (run_dir / "checkpoints").glob("step_*")
               if checkpoint_step(f) is not None and (f / TRAINING_STATE).is_file()]
    return max(folders, key=checkpoint_step, default=None)


def trim_metrics(run_dir: Path, step: int) -> None:
    """Keep the metrics rows of steps 1..`step`."""
    trim_rows(run_dir / "metrics.jsonl", step)


def trim_rows(path: Path, step: int) -> None:
    """Keep the rows of steps 1..`step` of a JSONL file of {"step": N, ...} rows (metrics.jsonl,
    samples.jsonl); a row cut short by a crash is dropped."""
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


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
