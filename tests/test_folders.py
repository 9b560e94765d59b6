"""opsd deletes only what it wrote: every command that can delete or replace a folder is tried with a
file a user planted in it, at the top and deeper down; the file survives and the command says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.errors import UserError
from opsd.folders import MARKER, foreign_entry, mark, remove_own

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ["distill", str(ROOT / "configs/tiny.yaml"), "run.steps=2", "run.save_every=1", "run.keep_last=1",
           "run.problems_per_step=2", "sampling.max_new_tokens=8", "run.tensorboard=false"]


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
    (step / "opsd_checkpoint.json").write_text(json.dumps({"files": ["model.safetensors"]}))
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


def test_overwrite_refuses_a_folder_opsd_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    notes = plant(out / "notes.txt")
    assert main([*DISTILL, f"run.output_dir={out}", "run.overwrite=true"]) == 2
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
    base = ["eval", f"data=[{data}]", "limit=2", "sampling.n=1", "sampling.max_new_tokens=4", "device=cpu"]
    foreign = tmp_path / "results"
    plant(foreign / "eval.json")
    assert main([*base, f"output_dir={foreign}", "overwrite=true"]) == 2
    assert "not an evaluation folder opsd created" in capsys.readouterr().err
    assert (foreign / "eval.json").read_text() == "my notes\n"
    own = tmp_path / "own"
    assert main([*base, f"output_dir={own}"]) == 0
    assert main([*base, f"output_dir={own}", "overwrite=true"]) == 0


def test_demo_refuses_a_folder_holding_a_users_file(tmp_path, capsys):
    out = tmp_path / "demo"
    notes = plant(out / "notes.txt")
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "--output-dir" in err and "Traceback" not in err
    assert notes.read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
