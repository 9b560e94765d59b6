"""What a checkpoint holds: weights in the start model's dtype (float32 master weights in the training
state only when those are rounded), a teacher file only for a teacher no file on disk holds, the start
model's fingerprint where a resume rebuilds from it, and `run.keep_weights` pruning."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from opsd.cli import main
from opsd.core.tiny import build_tiny, save_tiny
from opsd.runtime.checkpoint import prune_checkpoints
from opsd.runtime.folders import foreign_checkpoint, foreign_entry
from opsd.runtime.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DISTILL = ["distill", str(ROOT / "configs/tiny.yaml"), "sampling.max_new_tokens=8", "sampling.n=2",
           "run.problems_per_step=2", "optim.lr=1e-2", "run.report_to=[]"]


def distill(out: Path, *overrides: str) -> int:
    return main([*DISTILL, f"run.output_dir={out}", *overrides])


def bf16_model(folder: Path) -> Path:
    model, tokenizer = build_tiny()
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "training_state.pt", weights_only=True)


def test_weights_keep_the_start_models_dtype_and_the_master_copy_goes_into_the_training_state(tmp_path):
    start = bf16_model(tmp_path / "tiny-bf16")
    assert distill(tmp_path / "bf16", f"model.name_or_path={start}", "run.steps=1") == 0
    checkpoint = latest_checkpoint(tmp_path / "bf16")
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    master = state(checkpoint)["master_weights"]  # the trained float32 weights, of which the file holds the rounding
    assert {t.dtype for t in master.values()} == {torch.float32}
    assert all(torch.equal(master[name].to(torch.bfloat16), weights[name]) for name in master)
    assert AutoModelForCausalLM.from_pretrained(checkpoint).dtype == torch.bfloat16

    assert distill(tmp_path / "fp32", "run.steps=1") == 0  # builtin:tiny is float32: the file is the master copy
    checkpoint = latest_checkpoint(tmp_path / "fp32")
    assert {t.dtype for t in load_file(str(checkpoint / "model.safetensors")).values()} == {torch.float32}
    assert "master_weights" not in state(checkpoint)


@pytest.mark.parametrize("options, teacher_file, recorded", [
    (["teacher.weights.policy=frozen"], False, True),  # the start model: its path and fingerprint instead
    (["teacher.weights.policy=refresh", "teacher.weights.refresh_every=1"], True, False),
    (["teacher.weights.policy=ema"], True, False),
    (["teacher.weights.policy=live"], False, False),
    (["model.lora_rank=4"], False, True),  # frozen with LoRA: the base weights, which are the start model's
])
def test_a_teacher_file_only_for_a_teacher_no_file_on_disk_holds(tmp_path, options, teacher_file, recorded):
    pytest.importorskip("peft")
    assert distill(tmp_path / "run", "run.steps=1", *options) == 0
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert (checkpoint / "teacher.safetensors").exists() == teacher_file
    info = json.loads((checkpoint / "opsd_checkpoint.json").read_text())
    assert ("start_model" in info) == recorded
    if recorded:
        assert info["start_model"]["path"] == "builtin:tiny" and len(info["start_model"]["sha256"]) == 64


def test_resume_is_refused_when_the_frozen_teachers_start_model_changed_or_is_gone(tmp_path, capsys):
    start = save_tiny(tmp_path / "start")
    out = tmp_path / "run"
    assert distill(out, f"model.name_or_path={start}", "run.steps=1") == 0
    before = sorted(p.name for p in out.rglob("*"))
    save_tiny(start, seed=1)  # other weights at the same path
    capsys.readouterr()
    assert distill(out, f"model.name_or_path={start}", "run.steps=2") == 2
    err = capsys.readouterr().err
    assert f"cannot be resumed: its run takes weights it never saved (a frozen teacher, LoRA's base) from the start " \
           f"model {start}, which has changed since" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    shutil.rmtree(start)
    assert distill(out, f"model.name_or_path={start}", "run.steps=2") == 2
    err = capsys.readouterr().err
    assert f"model path {start} is not a model folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.rglob("*")) == before


def test_keep_weights_prunes_only_the_resume_files_of_older_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert distill(out, "run.steps=3", "run.save_every=1", "run.keep_last=1", "run.keep_weights=true",
                   "teacher.weights.policy=ema") == 0
    for step in (1, 2):
        pruned = out / "checkpoints" / f"step_{step:06d}"
        names = {p.name for p in pruned.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
        assert not names & {"training_state.pt", "teacher.safetensors"}
        listed = json.loads((pruned / "opsd_checkpoint.json").read_text())["files"]
        assert set(listed) == names - {"opsd_checkpoint.json"} and foreign_checkpoint(pruned) is None
    assert {p.name for p in (out / "checkpoints/step_000003").iterdir()} >= {"training_state.pt", "teacher.safetensors"}
    assert latest_checkpoint(out).name == "step_000003"
    pruned = out / "checkpoints/step_000001"  # still a Hugging Face folder: a later stage or eval loads it
    AutoModelForCausalLM.from_pretrained(pruned)
    AutoTokenizer.from_pretrained(pruned)

    # keep_weights may change on resume: without it, the older checkpoints go whole
    assert distill(out, "run.steps=4", "run.save_every=1", "run.keep_last=1", "teacher.weights.policy=ema") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004"]
    assert foreign_entry(out) is None


def test_keep_weights_leaves_a_checkpoint_holding_a_users_file_whole(tmp_path, capsys):
    def checkpoint(step: int) -> Path:
        folder = tmp_path / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        files = ["config.json", "model.safetensors", "training_state.pt"]
        for name in files:
            (folder / name).write_text("")
        (folder / "opsd_checkpoint.json").write_text(json.dumps({"step": step, "files": files}))
        return folder

    mine, planted, latest = checkpoint(1), checkpoint(2), checkpoint(3)
    (planted / "notes.txt").write_text("my notes\n")
    (mine / "opsd_checkpoint.json.tmp").write_text("{}")  # a rewrite of the file list cut short: ours
    prune_checkpoints(tmp_path, keep_last=1, keep_weights=True)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors", "opsd_checkpoint.json"]
    assert json.loads((mine / "opsd_checkpoint.json").read_text())["files"] == ["config.json", "model.safetensors"]
    assert (planted / "training_state.pt").exists() and "kept" in capsys.readouterr().err
    assert (latest / "training_state.pt").exists()
