"""`opsd CMD --check`: every check that needs no weights, and nothing written: each command on its example,
a model folder holding no weights at all (config.json and tokenizer only), and the sentences that would have
stopped the run."""

import importlib.util
import json
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.core.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "distill": [str(ROOT / "configs/tiny.yaml")],
    "rlvr": [str(ROOT / "configs/rlvr-tiny.yaml")],
    "sft": [str(ROOT / "configs/sft-tiny.yaml"), f"data.path={ROOT / 'configs/examples/arithmetic-pairs.jsonl'}"],
    "pipeline": [str(ROOT / "configs/pipeline-tiny.yaml")],
    "eval": [f"data=[{ROOT / 'configs/examples/arithmetic.jsonl'}]"],
}


def weightless(folder: Path) -> Path:
    """A model folder with its config.json and tokenizer and no weights: what a planned run's checks need."""
    save_tiny(folder)
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_every_command_checks_its_example_and_writes_nothing(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert main([command, *EXAMPLES[command], f"run.output_dir={out}", "--check"]) == 0
    assert "every check that needs no weights passed" in capsys.readouterr().out
    assert not out.exists()


def test_a_model_folder_without_weights_passes_the_checks_and_not_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    model = weightless(tmp_path / "stand-in")
    args = ["distill", *EXAMPLES["distill"], f"model.name_or_path={model}", f"run.output_dir={tmp_path / 'run'}"]
    assert main([*args, "--check"]) == 0
    assert main(args) == 2 and "could not load a model" in capsys.readouterr().err
    assert main(["pipeline", *EXAMPLES["pipeline"], f"model.name_or_path={model}", "--check",
                 f"run.output_dir={tmp_path / 'pipeline'}"]) == 0


@pytest.mark.parametrize("args,message", [
    (["distill", *EXAMPLES["distill"], "sampling.max_new_tokens=5000"], "more than the model's context of 2048"),
    (["rlvr", *EXAMPLES["rlvr"], "data.path=missing.jsonl"], "missing.jsonl does not exist"),
    (["distill", *EXAMPLES["distill"], "teacher.context=template", "teacher.template={oops}"], "teacher.template"),
    (["eval", "data=[missing.jsonl]"], "missing.jsonl"),
])
def test_the_checks_stop_with_the_sentence_that_would_stop_the_run(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main([*args, f"run.output_dir={tmp_path / 'out'}", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_pipeline_check_reaches_every_stage(tmp_path, capsys, monkeypatch):
    """A later stage's mistake that needs its data or lengths (not only its config) is found up front."""
    monkeypatch.chdir(ROOT)
    config = json.loads(json.dumps({"stages": [
        {"name": "rl", "command": "rlvr", "config": str(ROOT / "configs/rlvr-tiny.yaml")},
        {"name": "opsd", "command": "distill", "config": str(ROOT / "configs/tiny.yaml"),
         "overrides": ["sampling.max_new_tokens=5000"]}],
        "eval": {"data": [str(ROOT / "configs/examples/arithmetic.jsonl")]}}))
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(config))
    assert main(["pipeline", str(path), f"run.output_dir={tmp_path / 'out'}", "--check"]) == 2
    err = capsys.readouterr().err
    assert "pipeline stage 'opsd'" in err and "more than the model's context" in err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="needs an environment without vLLM")
def test_gpus_makes_the_checks_those_of_the_gpu_machine_described(capsys, monkeypatch):
    """On a login node (no GPU, no vLLM) `--check` refuses what this machine cannot run; with `--gpus N` it
    checks for N GPU processes instead: sleep mode and vLLM pass, run.problems_per_step is held against N;
    afterwards this process is one process again."""
    from opsd.runtime import distributed

    monkeypatch.chdir(ROOT)
    args = ["distill", "configs/tiny.yaml", "sampling.engine=vllm", "sampling.sleep_mode=true", "--check"]
    assert main(args) == 2
    assert "sampling.sleep_mode needs a GPU" in capsys.readouterr().err
    assert main([*args, "--gpus", "2"]) == 0, capsys.readouterr().err
    assert main([*args, "--gpus", "64", "run.problems_per_step=32"]) == 2
    assert "run.problems_per_step must be at least the number of processes (64)" in capsys.readouterr().err
    assert distributed.world_size() == 1 and not distributed.checking_another_machine()
