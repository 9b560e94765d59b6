"""What opsd may delete: only folders it recognises as its own, holding only what it wrote.

Every folder opsd creates for its output (a run, an evaluation, a pipeline, a demo, a model it
builds) gets a marker file, `opsd_folder.json`, naming its kind. Replacing a folder
(`run.overwrite=true`, `opsd demo` on its own folder) or pruning a checkpoint first checks that the
folder carries the marker and that every entry in it is one that opsd writes for that kind —
recursively, so a file a user put in `checkpoints/` or in an evaluation folder is found too. A
folder that fails the check is refused with one sentence naming the first foreign entry; nothing
is deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Literal

from opsd.core.errors import UserError

MARKER = "opsd_folder.json"
CHECKPOINT_INFO = "opsd_checkpoint.json"
CHECKPOINT_INFO_TMP = "opsd_checkpoint.json.tmp"  # its new version while a prune rewrites its file list
Kind = Literal["run", "eval", "pipeline", "demo", "listed"]  # listed: the marker lists the files
STEP = re.compile(r"step_(\d+)")  # a checkpoint folder, step_000010
PARTIAL_STEP = re.compile(r"step_(\d+)\.tmp")  # one being written (or interrupted)
SHARDED_STATE = "sharded_state"  # run.parallel=fsdp: torch.distributed.checkpoint's folder in a checkpoint
DCP_FILE = re.compile(r"__\d+_\d+\.distcp|\.metadata")  # what torch.distributed.checkpoint writes there
REPORT = "report"  # the folder `opsd report` writes into a run, pipeline or demo folder
WANDB_ID = "opsd-run-id"  # in RUN/wandb/ (run.report_to: wandb): the wandb run a resumed opsd run continues
TRACKIO_NAME = "trackio-run-name"  # in RUN/ (run.report_to: trackio): the trackio run a resumed opsd run continues
_WANDB_FILES = frozenset({WANDB_ID, "debug.log", "debug-internal.log", "latest-run"})  # what wandb.init(dir=RUN) writes
EVAL_OUTPUTS = ("eval.json", "eval.md", "responses.jsonl")  # what `opsd eval` writes (each through a .tmp)
EVAL_FILES = frozenset({*EVAL_OUTPUTS, *(f"{name}.tmp" for name in EVAL_OUTPUTS)})

# files a folder of each kind may hold besides the marker (subfolders are checked by `_foreign`)
_FILES: dict[str, frozenset[str]] = {
    "run": frozenset({"config.yaml", "metrics.jsonl", "metrics.jsonl.tmp", "samples.jsonl", "samples.jsonl.tmp",
                      TRACKIO_NAME}),
    "eval": EVAL_FILES | {"row.json"},
    "pipeline": frozenset({"config.yaml", "summary.json", "summary.md"}),
    "demo": frozenset({"summary.json", "summary.md"}),
}


def mark(folder: Path, kind: Kind, files: list[str] | None = None) -> None:
    """Write the marker saying `folder` is an opsd folder of `kind` (for `listed`: the files it holds)."""
    info = {"kind": kind, **({"files": sorted(files)} if files is not None else {})}
    (folder / MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def kind_of(folder: Path) -> str | None:
    """The kind in `folder`'s marker, or None when it has no readable marker."""
    return _read_json(folder / MARKER).get("kind")


def foreign_entry(folder: Path) -> Path | None:
    """The first entry of `folder` (searched recursively) that opsd did not write, or None."""
    kind = kind_of(folder)
    if kind is None:
        return folder / MARKER
    for entry in sorted(folder.iterdir()):
        if entry.name == MARKER:
            continue
        found = entry if entry.is_symlink() else _foreign(entry, kind, folder)
        if found is not None:
            return found
    return None


def _foreign(entry: Path, kind: str, folder: Path) -> Path | None:
    if entry.name == REPORT and kind_of(entry) == "listed" and kind in ("run", "pipeline", "demo"):  # `opsd report`
        return _own_subfolder(entry, "listed")
    if entry.is_file():
        if kind == "listed":
            return None if entry.name in _read_json(folder / MARKER).get("files", []) else entry
        return None if entry.name in _FILES.get(kind, frozenset()) else entry
    if kind == "run" and entry.name == "checkpoints":
        return _first(foreign_checkpoint(step) for step in sorted(entry.iterdir()))
    if kind == "run" and entry.name == "wandb" and (entry / WANDB_ID).is_file():  # run.report_to: wandb
        return _foreign_in_wandb(entry)
    if kind == "run" and entry.name == "tensorboard":
        return _first(None if f.is_file() and not f.is_symlink() and f.name.startswith("events.out.tfevents.") else f
                      for f in sorted(entry.iterdir()))
    if kind == "run":  # an evaluation written into the run folder
        return _own_subfolder(entry, "eval")
    if kind == "pipeline" and entry.name == "eval":
        return _first(_own_subfolder(f, "eval") for f in sorted(entry.iterdir()))
    if kind == "pipeline":
        return _own_subfolder(entry, "run")
    if kind == "demo":  # its data, the model it built, one pipeline (or one per seed)
        pipeline = entry.name == "pipeline" or entry.name.startswith("seed_")
        return _own_subfolder(entry, "pipeline" if pipeline else "listed")
    return entry


def _foreign_in_wandb(folder: Path) -> Path | None:
    """RUN/wandb/ holds our run id, wandb's logs and the latest-run link, and wandb's folder of each
    session of that run (offline-run-DATE-ID or run-DATE-ID, whose inside is wandb's); anything else
    is not ours."""
    run_id = (folder / WANDB_ID).read_text(encoding="utf-8").strip()
    session = re.compile(rf"(offline-)?run-\d{{8}}_\d{{6}}-{re.escape(run_id)}")
    return _first(None if entry.name in _WANDB_FILES or (entry.is_dir() and not entry.is_symlink()
                                                         and session.fullmatch(entry.name)) else entry
                  for entry in sorted(folder.iterdir()))


def foreign_checkpoint(step: Path) -> Path | None:
    """None when `step` is a checkpoint folder opsd wrote and holds nothing else: step_N with an
    opsd_checkpoint.json of step N listing every file in it (plus an evaluation written into it, and
    the info file's own rewrite cut short), or step_N.tmp, an interrupted write, whose info file was
    written first. Else the foreign entry."""
    whole, partial = STEP.fullmatch(step.name), PARTIAL_STEP.fullmatch(step.name)
    if step.is_symlink() or not step.is_dir() or not (whole or partial):
        return step
    info = _read_json(step / CHECKPOINT_INFO)
    if info.get("step") != int((whole or partial).group(1)):
        return step / CHECKPOINT_INFO
    if partial:
        return None
    listed = set(info.get("files", [])) | {CHECKPOINT_INFO, CHECKPOINT_INFO_TMP}
    if kind_of(step) == "eval":
        listed |= EVAL_FILES | {MARKER}
    return _first(_foreign_in_sharded_state(f) if f.name == SHARDED_STATE and f.name in listed and f.is_dir()
                  and not f.is_symlink() else None if f.name in listed and not f.is_symlink() else f
                  for f in sorted(step.iterdir()))


def _foreign_in_sharded_state(folder: Path) -> Path | None:
    """None when `folder` holds only torch.distributed.checkpoint's files, else the first other entry."""
    return _first(None if DCP_FILE.fullmatch(f.name) and f.is_file() and not f.is_symlink() else f
                  for f in sorted(folder.iterdir()))


def checkpoint_step(folder: Path) -> int | None:
    """N of a complete checkpoint folder step_N (not a link), else None."""
    match = STEP.fullmatch(folder.name)
    return int(match.group(1)) if match and folder.is_dir() and not folder.is_symlink() else None


def _own_subfolder(entry: Path, kind: str) -> Path | None:
    if not entry.is_dir() or entry.is_symlink() or kind_of(entry) != kind:
        return entry
    return foreign_entry(entry)


def _first(found) -> Path | None:
    return next((f for f in found if f is not None), None)


def remove_own(folder: Path, what: str, kind: str | None = None) -> None:
    """Delete `folder` if opsd wrote it (as a folder of `kind`, when given) and all it holds;
    otherwise refuse with one sentence. `what` names the option that asked for the deletion."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"{what}: {folder} is a link or a file, not a folder opsd created; nothing was deleted")
    found = kind_of(folder)
    if kind is not None and found is not None and found != kind:
        raise UserError(f"{what}: {folder} is an opsd {found} folder, not a {kind} folder; nothing was deleted "
                        "(choose another folder)")
    foreign = foreign_entry(folder)
    if foreign is not None:
        if foreign == folder / MARKER:
            first = next(iter(sorted(folder.iterdir())), None)
            reason = f"has no opsd marker (opsd_folder.json){f' and holds {first.name}' if first else ''}"
        else:
            reason = f"holds {foreign}, which opsd did not write"
        raise UserError(f"{what}: {folder} {reason}; opsd deletes only folders it wrote, so nothing was deleted "
                        "(choose another folder or remove it yourself)")
    shutil.rmtree(folder)


def remove_partial_checkpoint(tmp: Path) -> None:
    """Delete an interrupted checkpoint write of ours (step_N.tmp), refusing anything else."""
    if foreign_checkpoint(tmp) is not None:
        raise UserError(f"{tmp} is not an interrupted checkpoint write of opsd's; nothing was deleted (remove it "
                        "yourself)")
    shutil.rmtree(tmp)
