"""Crash safety and exact resume: runs killed with SIGKILL at chosen moments (mid-generation, after a
step, while a checkpoint is being written), started again on their folder, end with the weights,
metrics and saved samples of a run that was never interrupted (bitwise: same CPU, one thread, same seeds),
also from a start model stored in bfloat16 (float32 master weights in the training state)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opsd.cli import main
from opsd.core.tiny import build_tiny
from opsd.runtime.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DISTILL = [str(ROOT / "configs/tiny.yaml"), "sampling.max_new_tokens=12", "sampling.n=2", "run.problems_per_step=2",
           "optim.micro_batch_size=2", "optim.lr=1e-2", "run.steps=4", "run.save_every=1", "run.keep_last=2",
           "run.report_to=[]", "teacher.weights.policy=ema", "teacher.weights.ema_decay=0.5"]
SFT = [str(ROOT / "configs/sft-tiny.yaml"), f"data.path={ROOT / 'configs/examples/arithmetic-pairs.jsonl'}",
       "run.steps=4", "run.save_every=1", "run.problems_per_step=4", "run.report_to=[]"]
RLVR = [str(ROOT / "configs/rlvr-tiny.yaml"), "run.steps=3", "run.save_every=1", "run.problems_per_step=2",
        "sampling.max_new_tokens=12", "run.report_to=[]"]
UNTIMED = ("time/", "throughput/")


def opsd(command, args, out, crash_at=None, signal_name="KILL"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "OPSD_CRASH_SIGNAL": signal_name}
    env.pop("OPSD_CRASH_AT", None)
    if crash_at:
        env["OPSD_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "opsd.cli", command, *args, f"run.output_dir={out}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def final_weights(out):
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def metric_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(UNTIMED)} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for command, args in (("distill", DISTILL), ("sft", SFT), ("rlvr", RLVR)):
        out = tmp_path_factory.mktemp("reference") / command
        assert opsd(command, args, out).returncode == 0
        runs[command] = out
    return runs


@pytest.mark.parametrize("command, crash_at", [
    ("distill", "decode:30"),  # mid-generation of step 3
    ("distill", "step:3"),  # after step 3's metrics row, before its checkpoint
    ("distill", "checkpoint:2"),  # while writing step 2's checkpoint
    ("sft", "checkpoint:3"),
    ("rlvr", "decode:15"),
])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, command, crash_at):
    args = {"distill": DISTILL, "sft": SFT, "rlvr": RLVR}[command]
    out = tmp_path / "run"
    killed = opsd(command, args, out, crash_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = opsd(command, args, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    reference = uninterrupted[command]
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if command == "distill":  # the EMA teacher's snapshot too
        teacher = lambda o: load_file(str(latest_checkpoint(o) / "teacher.safetensors"))
        assert all(torch.equal(teacher(reference)[k], v) for k, v in teacher(out).items())
    rows = metric_rows(out)
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    assert rows == metric_rows(reference)
    if command != "sft":  # the saved rollouts too: the redone steps' rows once, equal to the uninterrupted run's
        assert (out / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()


@pytest.mark.parametrize("command, signal_name, signal_at", [
    ("distill", "TERM", "decode:18"),  # mid-generation of step 2 (6 decode points a step)
    ("rlvr", "USR1", "decode:20"),  # SLURM's --signal=USR1@SECONDS, mid-generation of step 2
])
def test_a_signalled_run_ends_its_step_writes_a_checkpoint_and_resumes_to_the_uninterrupted_result(
        tmp_path, uninterrupted, command, signal_name, signal_at):
    """SIGTERM/SIGUSR1 (a cluster's warning): the step in progress finishes, its checkpoint is written, the
    command exits 75 with one sentence; run again, it ends where the uninterrupted run does."""
    args = {"distill": DISTILL, "rlvr": RLVR}[command]
    out = tmp_path / "run"
    stopped = opsd(command, args, out, signal_at, signal_name)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert f"opsd: stopped: SIG{signal_name}: stopped after step 2 with its checkpoint" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert latest_checkpoint(out).name == "step_000002"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed = opsd(command, args, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = final_weights(uninterrupted[command]), final_weights(out)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert metric_rows(out) == metric_rows(uninterrupted[command])


def test_killed_run_of_a_bf16_model_resumes_to_the_uninterrupted_result(tmp_path):
    """The start model is stored in bfloat16: checkpoints hold bf16 weights, the float32 master weights
    go into the training state, and the frozen teacher is rebuilt from the start model."""
    start = tmp_path / "tiny-bf16"
    model, tokenizer = build_tiny()
    model.to(torch.bfloat16).save_pretrained(start)
    tokenizer.save_pretrained(start)
    args = [*DISTILL, f"model.name_or_path={start}", "teacher.weights.policy=frozen"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert opsd("distill", args, reference).returncode == 0
    killed = opsd("distill", args, out, "step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(out).name == "step_000002"
    resumed = opsd("distill", args, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected, got = final_weights(reference), final_weights(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16} and expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    state = lambda o: torch.load(latest_checkpoint(o) / "training_state.pt", weights_only=True)
    expected, got = state(reference), state(out)
    assert {t.dtype for t in got["master_weights"].values()} == {torch.float32}
    assert all(torch.equal(expected["master_weights"][k], v) for k, v in got["master_weights"].items())
    moments = lambda s: [t for p in s["optimizer"]["state"].values() for t in (p["exp_avg"], p["exp_avg_sq"])]
    assert all(torch.equal(a, b) for a, b in zip(moments(expected), moments(got), strict=True))
    assert not (latest_checkpoint(out) / "teacher.safetensors").exists()
    assert metric_rows(out) == metric_rows(reference)


def test_checkpoints_keep_the_last_k_and_leave_no_temporary_folder(uninterrupted):
    names = sorted(p.name for p in (uninterrupted["distill"] / "checkpoints").iterdir())
    assert names == ["step_000003", "step_000004"]


def test_a_finished_run_started_again_does_nothing(tmp_path, uninterrupted):
    rows = metric_rows(uninterrupted["sft"])
    again = opsd("sft", SFT, uninterrupted["sft"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert metric_rows(uninterrupted["sft"]) == rows


def test_resuming_under_another_config_is_refused(tmp_path, uninterrupted, capsys):
    out = uninterrupted["distill"]
    before = sorted(p.name for p in out.rglob("*"))
    code = main(["distill", *DISTILL, f"run.output_dir={out}", "loss.kind=forward_kl"])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds a run of another config (loss.kind is 'reverse_kl' there, 'forward_kl' here)" in err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_resume_flag_without_a_run_is_refused(tmp_path, capsys):
    code = main(["distill", "--resume", *DISTILL, f"run.output_dir={tmp_path / 'nothing'}"])
    assert code == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_weights(tmp_path, monkeypatch, capsys):
    import opsd.runtime.training
    import opsd.stages.distill

    real = opsd.runtime.training.guarded_step

    def nan_after_first_step(model, optimizer, max_grad_norm, has_gradient=True):
        if optimizer.state and any(s.get("step", 0) >= 1 for s in optimizer.state.values()):
            optimizer.zero_grad(set_to_none=True)
            return float("nan"), True
        return real(model, optimizer, max_grad_norm, has_gradient)

    monkeypatch.setattr(opsd.stages.distill, "guarded_step", nan_after_first_step)
    out = tmp_path / "run"
    code = main(["distill", *DISTILL, f"run.output_dir={out}", "run.steps=10", "run.save_every=0",
                 "optim.max_skipped_in_a_row=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "training stopped after step 4: 3 steps in a row had a non-finite loss or gradient" in err
    assert latest_checkpoint(out).name == "step_000004"
    rows = metric_rows(out)
    assert [r["optim/skipped_steps"] for r in rows] == [0, 1, 2, 3]


def test_killed_pipeline_resumes_at_the_stage_it_was_in(tmp_path):
    out = tmp_path / "pipeline"
    args = [str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=4",
            "stages=[{name: sft, command: sft, config: configs/sft-tiny.yaml, overrides: "
            "[data.path=configs/examples/arithmetic-pairs.jsonl, run.steps=3, run.save_every=1]}, "
            "{name: opsd, command: distill, config: configs/tiny.yaml, overrides: "
            "[run.steps=3, run.save_every=1, sampling.max_new_tokens=12, run.problems_per_step=2]}]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPSD_CRASH_AT": "step:5"}  # sft's 3 steps, then opsd's 2nd
    run = lambda env: subprocess.run([sys.executable, "-m", "opsd.cli", "pipeline", *args],
                                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    killed = run(env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    sft_rows = (out / "sft" / "metrics.jsonl").read_text()
    assert latest_checkpoint(out / "opsd").name == "step_000001"
    env.pop("OPSD_CRASH_AT")
    resumed = run(env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "sft" / "metrics.jsonl").read_text() == sft_rows  # not trained again
    assert [r["step"] for r in metric_rows(out / "opsd")] == [1, 2, 3]
    assert [r["stage"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["start", "sft", "opsd"]
