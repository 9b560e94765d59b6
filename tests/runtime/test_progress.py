"""Progress bars: named by their stage, counting steps, showing the step just done; `opsd eval` has a
bar over problems whose batches are the engine's own (the pipeline's stage headers: test_pipeline.py)."""

from pathlib import Path

import pytest
import torch

from opsd.cli import main
from opsd.core.tiny import build_tiny
from opsd.generation import SamplingConfig, make_engine
from opsd.runtime.metrics import MetricsLog, progress_bar
from opsd.stages.eval import decode

ROOT = Path(__file__).resolve().parents[2]
STAGES = {
    "distill": [str(ROOT / "configs/tiny.yaml"), "sampling.max_new_tokens=8", "run.problems_per_step=2"],
    "sft": [str(ROOT / "configs/sft-tiny.yaml"), f"data.path={ROOT / 'configs/examples/arithmetic-pairs.jsonl'}",
            "run.problems_per_step=2"],
    "rlvr": [str(ROOT / "configs/rlvr-tiny.yaml"), "sampling.max_new_tokens=8", "run.problems_per_step=2"],
}


def last_drawn(err: str) -> str:
    """What the terminal shows last of a bar: the final carriage-return-separated frame."""
    return [frame for frame in err.replace("\n", "\r").split("\r") if frame.strip()][-1]


def test_the_bar_shows_the_numbers_of_the_step_just_done(tmp_path, capsys):
    with MetricsLog(tmp_path, total_steps=3, report_to=(), name="distill") as log:
        log.write(1, {"x": 1.0}, postfix={"div": 0.25})
        frame = last_drawn(capsys.readouterr().err)
        assert frame.startswith("distill:") and "1/3" in frame and "div=0.25" in frame and "step" in frame
        log.write(2, {"x": 2.0}, postfix={"div": 0.125})
        frame = last_drawn(capsys.readouterr().err)
        assert "2/3" in frame and "div=0.125" in frame and "div=0.25" not in frame


@pytest.mark.parametrize("command", STAGES)
def test_each_command_names_its_bar_and_counts_steps(tmp_path, capsys, command):
    out = tmp_path / command
    assert main([command, *STAGES[command], f"run.output_dir={out}", "run.steps=2", "run.report_to=[]"]) == 0
    err = capsys.readouterr().err
    frame = last_drawn(err.split(f"opsd {command}: 2 steps done")[0])  # the bar's last frame, before the summary
    assert frame.startswith(f"{command}:") and "2/2" in frame and "step" in frame
    assert "opsd:" not in err.replace("opsd: warning", "")  # the old unnamed bar


def test_eval_has_a_bar_over_the_problems_of_each_file(tmp_path, capsys):
    data = ROOT / "configs/examples/arithmetic.jsonl"
    assert main(["eval", f"data=[{data}]", "limit=5", "sampling.n=2", "sampling.max_new_tokens=4",
                 "sampling.batch_size=4", "greedy=true", "run.device=cpu", f"run.output_dir={tmp_path / 'eval'}"]) == 0
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\n", "\r").split("\r") if f.startswith("eval · arithmetic")]
    assert any("2/5" in f for f in frames) and "5/5" in frames[-1] and "problem" in frames[-1]
    assert any(f.startswith("eval · arithmetic · greedy") and "5/5" in f for f in frames)


def test_decoding_in_the_engines_batches_samples_what_one_call_does():
    model, tokenizer = build_tiny()
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, n=2, batch_size=3)
    prompts = [tokenizer(f"Compute {i} + 1.")["input_ids"] for i in range(4) for _ in range(2)]
    seeds = list(range(100, 108))
    engine = make_engine(model, tokenizer, sampling)
    with torch.no_grad(), progress_bar("eval", 4, "problem") as bar:
        ids, truncated, _ = decode(engine, prompts, sampling, seeds, bar, per_problem=2)
        assert bar.n == 4
    whole = engine.generate(prompts, sampling, seeds)
    assert ids == [g.response_ids for g in whole] and truncated == [g.truncated for g in whole]
