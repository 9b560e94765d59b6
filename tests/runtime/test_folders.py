"""opsd deletes only what it wrote: every command that can delete or replace a folder is tried with a
file a user planted in it, at the top and deeper down; the file survives and the command says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.core.errors import UserError
from opsd.runtime.folders import MARKER, foreign_entry, mark, remove_own

ROOT = Path(__file__).resolve().parents[2]
DISTILL = ["distill", str(ROOT / "configs/tiny.yaml"), "run.steps=2", "run.save_every=1", "run.keep_last=1",
           "run.problems_per_step=2", "sampling.max_new_tokens=8", "run.report_to=[]"]


def plant(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("my notes\n")
    return path


def test_foreign_entries_are_found_at_any_depth(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    mark(run, "run")
    (run / "config.yaml").write_text("{}")
    step = run / "checkpoints" / "step_000001"
    (step / "model.safetensors").write_text("")
    (step / "opsd_checkpoint.json").write_text(json.dumps({"step": 1, "files": ["model.safetensors"]}))
    assert foreign_entry(run) is None
    notes = plant(step / "notes.txt")
    assert foreign_entry(run) == notes
    notes.unlink()
    assert foreign_entry(run) is None
    plant(tmp_path / "unmarked" / "data.txt")
    assert foreign_entry(tmp_path / "unmarked") is not None
    with pytest.raises(UserError, match="no opsd marker"):
        remove_own(tmp_path / "unmarked", "run.overwrite=true")
    assert (tmp_path / "unmarked").is_dir()


STAGES = {
    "distill": DISTILL,
    "sft": ["sft", str(ROOT / "configs/sft-tiny.yaml"),
            f"data.path={ROOT / 'configs/examples/arithmetic-pairs.jsonl'}", "run.steps=1"],
    "rlvr": ["rlvr", str(ROOT / "configs/rlvr-tiny.yaml"), "run.steps=1"],
}


@pytest.mark.parametrize("stage", STAGES)
def test_overwrite_refuses_a_folder_opsd_did_not_write(tmp_path, capsys, stage):
    out = tmp_path / "mine"
    notes = plant(out / "notes.txt")
    assert main([*STAGES[stage], f"run.output_dir={out}", "run.overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "run.overwrite=true" in err and "nothing was deleted" in err and "Traceback" not in err
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize("where", ["notes.txt", "checkpoints/notes.txt", "checkpoints/step_000002/notes.txt"])
def test_overwrite_replaces_an_opsd_run_but_not_a_file_planted_in_it(tmp_path, capsys, where):
    out = tmp_path / "run"
    assert main([*DISTILL, f"run.output_dir={out}"]) == 0
    assert (out / MARKER).is_file()
    notes = plant(out / where)
    assert main([*DISTILL, f"run.output_dir={out}", "run.overwrite=true", "loss.kind=forward_kl"]) == 2
    assert where.split("/")[-1] in capsys.readouterr().err and notes.is_file()
    notes.unlink()
    assert main([*DISTILL, f"run.output_dir={out}", "run.overwrite=true", "loss.kind=forward_kl"]) == 0
    assert "forward_kl" in (out / "config.yaml").read_text()


def test_pruning_keeps_a_checkpoint_holding_a_users_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*DISTILL, f"run.output_dir={out}", "run.steps=1"]) == 0
    notes = plant(out / "checkpoints" / "step_000001" / "notes.txt")
    assert main([*DISTILL, f"run.output_dir={out}", "run.steps=2"]) == 0  # resumes; keep_last=1 would prune step 1
    assert notes.is_file() and (out / "checkpoints" / "step_000002").is_dir()
    assert "kept" in capsys.readouterr().err


def test_pipeline_overwrite_refuses_a_planted_file(tmp_path, capsys):
    out = tmp_path / "pipe"
    notes = plant(out / "results.csv")
    code = main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "run.overwrite=true"])
    assert code == 2 and "results.csv" in capsys.readouterr().err and notes.is_file()


def test_eval_replaces_only_its_own_outputs(tmp_path, capsys):
    data = ROOT / "configs/examples/arithmetic.jsonl"
    base = ["eval", f"data=[{data}]", "limit=2", "sampling.n=1", "sampling.max_new_tokens=4", "run.device=cpu"]
    foreign = tmp_path / "results"
    plant(foreign / "eval.json")
    assert main([*base, f"run.output_dir={foreign}", "run.overwrite=true"]) == 2
    assert "not an evaluation folder opsd created" in capsys.readouterr().err
    assert (foreign / "eval.json").read_text() == "my notes\n"
    own = tmp_path / "own"
    assert main([*base, f"run.output_dir={own}"]) == 0
    assert main([*base, f"run.output_dir={own}", "run.overwrite=true"]) == 0


def test_demo_refuses_a_folder_holding_a_users_file(tmp_path, capsys):
    out = tmp_path / "demo"
    notes = plant(out / "notes.txt")
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "--output-dir" in err and "Traceback" not in err
    assert notes.read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_folder_of_another_kind_is_never_replaced(tmp_path, capsys):
    """`opsd demo` replaces an earlier demo's folder, never a training run (nor anything else opsd wrote)."""
    out = tmp_path / "run"
    assert main([*DISTILL, f"run.output_dir={out}", "run.steps=1"]) == 0
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    assert "is an opsd run folder, not a demo folder" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_000001").is_dir()


def test_checkpoint_names_links_and_partial_writes(tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    (checkpoints / "step_000002.tmp").mkdir(parents=True)
    mark(run, "run")
    partial = checkpoints / "step_000002.tmp"
    assert foreign_entry(run) == partial / "opsd_checkpoint.json"  # not recognisably ours: never deleted
    (partial / "opsd_checkpoint.json").write_text(json.dumps({"step": 2, "partial": True}))
    (partial / "model.safetensors").write_text("")
    assert foreign_entry(run) is None  # an interrupted write of ours
    backup = checkpoints / "step_000001_best"
    backup.mkdir()
    assert foreign_entry(run) == backup  # a user's copy next to the checkpoints
    backup.rmdir()
    (checkpoints / "step_000003").symlink_to(partial)
    assert foreign_entry(run) == checkpoints / "step_000003"
    (checkpoints / "step_000003").unlink()
    tensorboard = run / "tensorboard"
    tensorboard.mkdir()
    (tensorboard / "events.out.tfevents.1.host").write_text("")
    assert foreign_entry(run) is None
    notes = plant(tensorboard / "notes.txt")
    assert foreign_entry(run) == notes


def test_resuming_removes_only_an_interrupted_write_of_ours(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*DISTILL, f"run.output_dir={out}", "run.steps=1"]) == 0
    fake = plant(out / "checkpoints" / "step_000005.tmp" / "mine.txt").parent
    assert main([*DISTILL, f"run.output_dir={out}", "run.steps=2"]) == 2
    assert "not an interrupted checkpoint write" in capsys.readouterr().err and fake.is_dir()


def test_an_evaluation_written_into_a_run_folder_is_part_of_it(tmp_path):
    out = tmp_path / "run"
    assert main([*DISTILL, f"run.output_dir={out}", "run.steps=1"]) == 0
    checkpoint = out / "checkpoints" / "step_000001"
    base = ["eval", f"data=[{ROOT / 'configs/examples/arithmetic.jsonl'}]", "limit=2", "sampling.n=1",
            "sampling.max_new_tokens=4", "run.device=cpu", f"model.name_or_path={checkpoint}"]
    assert main([*base, f"run.output_dir={out / 'eval'}"]) == 0
    assert main([*base, f"run.output_dir={checkpoint}"]) == 0  # into the checkpoint folder itself
    # samples.jsonl and the evaluations' responses.jsonl are opsd's own files too
    assert all((folder / name).is_file() for folder, name in
               [(out, "samples.jsonl"), (out / "eval", "responses.jsonl"), (checkpoint, "responses.jsonl")])
    assert foreign_entry(out) is None
    plant(out / "eval" / "notes.txt")
    assert foreign_entry(out) == out / "eval" / "notes.txt"
