"""The same loop under torchrun: two CPU processes (gloo), DDP-wrapped student, rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
# greedy decoding and a fixed problem order: both runs see the same rollouts
SAME_WORK = ["run.steps=1", "run.problems_per_step=4", "sampling.n=1", "sampling.temperature=0",
             "sampling.max_new_tokens=12", "data.shuffle=false", "run.report_to=[]", "optim.max_grad_norm=1e9",
             "optim.micro_batch_size=1", "optim.lr=1e-2"]


def run(out: Path, processes: int) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "opsd.cli", "distill", str(ROOT / "configs/tiny.yaml"),
               f"run.output_dir={out}", *SAME_WORK]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run folder:") == 1  # rank 0 alone reports
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


# back in the default suite: the exit deadlock once seen in a few runs did not recur in 60 runs in a row
def test_two_processes_compute_the_single_process_gradient(tmp_path):
    single, double = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert single["rollout/count"] == 4 and double["rollout/count"] == 2  # rank 0 logs its half
    assert double["optim/grad_norm"] == pytest_approx(single["optim/grad_norm"])
    a = load_file(str(tmp_path / "one/checkpoints/step_000001/model.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step_000001/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    # samples.jsonl: rank 0 alone writes, its own rollouts, the same as a single process samples for them
    samples = lambda out: [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    one = {s["id"]: s for s in samples(tmp_path / "one")}
    two = samples(tmp_path / "two")
    assert len(one) == 4 and len(two) == 2
    for row in two:
        assert row["response"] == one[row["id"]]["response"]
        assert row["divergence"] == pytest_approx(one[row["id"]]["divergence"])


def pytest_approx(value):
    return pytest.approx(value, rel=1e-4)
