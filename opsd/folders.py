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
import shutil
from pathlib import Path
from typing import Literal

from opsd.errors import UserError

MARKER = "opsd_folder.json"
CHECKPOINT_INFO = "opsd_checkpoint.json"
Kind = Literal["run", "eval", "pipeline", "demo", "listed"]  # listed: the marker lists the files

# entries a folder of each kind may hold besides the marker (subfolders are checked by `_foreign`)
_FILES: dict[str, frozenset[str]] = {
    "run": frozenset({"config.yaml", "metrics.jsonl", "metrics.jsonl.tmp", "samples.jsonl"}),
    "eval": frozenset({"eval.json", "eval.md", "eval.json.tmp", "eval.md.tmp", "responses.jsonl", "row.json"}),
    "pipeline": frozenset({"config.yaml", "summary.json", "summary.md"}),
    "demo": frozenset(),
}


def mark(folder: Path, kind: Kind, files: list[str] | None = None) -> None:
    """Write the marker saying `folder` is an opsd folder of `kind` (for `listed`: the files it holds)."""
    info = {"kind": kind, **({"files": sorted(files)} if files is not None else {})}
    (folder / MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def kind_of(folder: Path) -> str | None:
    """The kind in `folder`'s marker, or None when it has no readable marker."""
    try:
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("kind") if isinstance(info, dict) else None


def foreign_entry(folder: Path) -> Path | None:
    """The first entry of `folder` (searched recursively) that opsd did not write, or None."""
    kind = kind_of(folder)
    if kind is None:
        return folder / MARKER
    for entry in sorted(folder.iterdir()):
        if entry.name == MARKER:
            continue
        if entry.is_symlink():
            return entry
        found = _foreign(entry, kind, folder)
        if found is not None:
            return found
    return None


def _foreign(entry: Path, kind: str, folder: Path) -> Path | None:
    if entry.is_file():
        if kind == "listed":
            listed = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("files", [])
            return None if entry.name in listed else entry
        return None if entry.name in _FILES.get(kind, frozenset()) else entry
    if kind == "run" and entry.name == "checkpoints":
        return _first(foreign_checkpoint(step) for step in sorted(entry.iterdir()))
    if kind == "run" and entry.name == "tensorboard":
        return _first(None if f.is_file() and f.name.startswith("events.out.tfevents.") else f
                      for f in sorted(entry.iterdir()))
    if kind == "pipeline" and entry.name == "eval":
        return _first(_own_subfolder(f, "eval") for f in sorted(entry.iterdir()))
    if kind == "pipeline":
        return _own_subfolder(entry, "run")
    if kind == "demo":
        return _own_subfolder(entry, "pipeline" if entry.name == "pipeline" else "listed")
    return entry


def foreign_checkpoint(step: Path) -> Path | None:
    """A checkpoint folder holds exactly the files its opsd_checkpoint.json lists (a `.tmp` one is
    an interrupted write of ours)."""
    if not step.is_dir() or not step.name.startswith("step_"):
        return step
    if step.name.endswith(".tmp"):
        return None
    try:
        listed = set(json.loads((step / CHECKPOINT_INFO).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return step / CHECKPOINT_INFO
    return _first(None if f.name in listed or f.name == CHECKPOINT_INFO else f for f in sorted(step.iterdir()))


def _own_subfolder(entry: Path, kind: str) -> Path | None:
    if not entry.is_dir() or entry.is_symlink() or kind_of(entry) != kind:
        return entry
    return foreign_entry(entry)


def _first(found) -> Path | None:
    return next((f for f in found if f is not None), None)


def remove_own(folder: Path, what: str) -> None:
    """Delete `folder` if opsd wrote it and all it holds; otherwise refuse with one sentence.
    `what` names the option that asked for the deletion."""
    if not folder.exists():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder opsd created; nothing was deleted")
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
