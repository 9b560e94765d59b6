"""samples.jsonl: which rollouts are saved, the per-sequence divergence against the step's token mean,
what distill and rlvr record of each, and the file cut back on resume (the kill-and-resume comparison
is in test_resume.py)."""

import json
from pathlib import Path

import pytest
import torch

from opsd.cli import main
from opsd.core.packing import pack, per_sequence_mean
from opsd.generation.rollouts import pick
from opsd.runtime.runs import trim_rows

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["sampling.max_new_tokens=12", "run.problems_per_step=4", "run.report_to=[]"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pick_spreads_over_the_step_and_takes_all_when_few():
    assert pick(8, 4) == [0, 2, 4, 6]
    assert pick(10, 3) == [0, 3, 6]
    assert pick(3, 4) == [0, 1, 2]
    assert pick(5, 0) == []


def test_per_sequence_mean_is_the_mean_over_each_sequences_response_tokens():
    packed = pack([[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10], [11, 12]], pad_id=0, device=torch.device("cpu"))
    value_N = torch.arange(6, dtype=torch.float32) * 0.5
    naive = []
    for row in range(3):
        values = [float(v) for v, r in zip(value_N, packed.row_N) if int(r) == row]
        naive.append(sum(values) / len(values))
    assert per_sequence_mean(value_N, packed.row_N, 3).tolist() == pytest.approx(naive)
    assert per_sequence_mean(value_N[:4], packed.row_N[:4], 4)[3].isnan()  # a sequence without tokens


def test_trim_keeps_rows_up_to_the_step_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "id": str(s)}) + "\n" for s in (1, 1, 2, 3)) + '{"step": 4, "id"')
    trim_rows(path, 2)
    assert [r["step"] for r in rows_of(path)] == [1, 1, 2]
    trim_rows(tmp_path / "absent.jsonl", 1)  # nothing to cut
    assert not (tmp_path / "absent.jsonl").exists()


def test_distill_samples_hold_grade_gate_teacher_prompt_and_divergence(tmp_path):
    out = tmp_path / "run"
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", *COMMON, "sampling.n=2",
                 "run.steps=2", "samples_per_step=100"]) == 0
    samples, metrics = rows_of(out / "samples.jsonl"), rows_of(out / "metrics.jsonl")
    for step, row in enumerate(metrics, 1):
        saved = [s for s in samples if s["step"] == step]
        assert len(saved) == row["rollout/count"] == 8  # all of them: samples_per_step ≥ the step's rollouts
        assert sum(s["correct"] for s in saved) / 8 == row["rollout/accuracy"]
        assert sum(s["response_tokens"] for s in saved) / 8 == row["rollout/response_tokens_mean"]
        # the per-sequence means, weighted by length, give back the step's token mean
        tokens = sum(s["response_tokens"] for s in saved)
        assert sum(s["divergence"] * s["response_tokens"] for s in saved) / tokens == pytest.approx(
            row["loss/divergence"], rel=1e-5)
    first = samples[0]
    assert set(first) == {"step", "id", "prompt", "response", "extracted", "answer", "correct", "truncated",
                          "response_tokens", "kept", "teacher_prompt", "divergence"}
    assert first["prompt"].startswith("<|im_start|>user\nCompute ")
    assert first["prompt"].endswith("<|im_start|>assistant\n")
    assert "reference solution" in first["teacher_prompt"] and "reference solution" not in first["prompt"]
    assert first["kept"] and first["id"].startswith("arith_") and first["answer"]


def test_distill_saves_samples_per_step_rollouts_and_none_with_zero(tmp_path):
    out = tmp_path / "four"
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", *COMMON, "sampling.n=2",
                 "run.steps=1"]) == 0
    assert len(rows_of(out / "samples.jsonl")) == 4  # the default, spread over the step's 8 rollouts
    out = tmp_path / "none"
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", *COMMON, "run.steps=1",
                 "samples_per_step=0"]) == 0
    assert not (out / "samples.jsonl").exists()


def test_rlvr_samples_hold_reward_advantage_and_the_group_filter(tmp_path):
    out = tmp_path / "rlvr"
    assert main(["rlvr", str(ROOT / "configs/rlvr-tiny.yaml"), f"run.output_dir={out}", "run.steps=1",
                 "grpo.overlong_buffer=24", "sampling.max_new_tokens=32", "samples_per_step=100",
                 "run.report_to=[]"]) == 0
    samples, (metrics,) = rows_of(out / "samples.jsonl"), rows_of(out / "metrics.jsonl")
    assert len(samples) == metrics["rollout/count"]
    assert sum(s["reward"] for s in samples) / len(samples) == pytest.approx(metrics["reward/mean"], abs=1e-6)
    assert sum(s["kept"] for s in samples) == metrics["rollout/kept"]
    assert {"reward", "advantage", "kept", "prompt", "response", "extracted", "correct"} <= set(samples[0])
    assert "teacher_prompt" not in samples[0]
    for problem in {s["id"] for s in samples}:  # advantages are centred within each problem's group
        group = [s["advantage"] for s in samples if s["id"] == problem]
        assert sum(group) == pytest.approx(0.0, abs=1e-5)


def test_a_resumed_run_cuts_samples_back_to_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", *COMMON, "run.save_every=1"]
    assert main([*args, "run.steps=2"]) == 0
    stale = {"step": 3, "id": "written after the checkpoint of step 2"}
    with (out / "samples.jsonl").open("a") as file:
        file.write(json.dumps(stale) + "\n")
    assert main([*args, "run.steps=3"]) == 0
    samples = rows_of(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4 + [3] * 4 and stale not in samples
