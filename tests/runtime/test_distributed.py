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
def test_two_processes_compute_the_single_process_gradient_metrics_and_samples(tmp_path):
    """The same step on one process and on two: the weights, every metric but the timings (reduced over both
    processes: counts summed, means weighted by what they average over, maxima), and samples.jsonl rows from
    both processes, each naming its process, equal to the one-process rows of the same rollouts."""
    single, double = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert single["rollout/count"] == double["rollout/count"] == 4
    assert single.keys() == double.keys()
    for key in single:
        if key.startswith(("time/", "throughput/")) or single[key] is None:
            assert single[key] is None or double[key] is not None, key
            continue
        assert double[key] == pytest_approx(single[key]), key
    a = load_file(str(tmp_path / "one/checkpoints/step_000001/model.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step_000001/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    samples = lambda out: [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    one = {s["id"]: s for s in samples(tmp_path / "one")}
    two = samples(tmp_path / "two")
    assert len(one) == len(two) == 4 and sorted(row["process"] for row in two) == [0, 0, 1, 1]
    for row in two:
        assert row["response"] == one[row["id"]]["response"]
        assert row["divergence"] == pytest_approx(one[row["id"]]["divergence"])


def pytest_approx(value):
    return pytest.approx(value, rel=1e-4)


TALLY = """
import json, os, sys
from opsd.runtime import distributed
from opsd.runtime.metrics import Tally
import torch
rank = distributed.setup(torch.device("cpu"))
parts = json.loads(sys.argv[1])
mine = parts[rank::distributed.world_size()] if distributed.world_size() > 1 else parts
tally = Tally()
tally.mean("loss", sum(p["loss"] * p["tokens"] for p in mine), sum(p["tokens"] for p in mine))
tally.mean("nothing", 0.0, 0)
tally.sum("count", len(mine))
tally.max("longest", max((p["tokens"] for p in mine), default=float("nan")))
tally.min("shortest", min((p["tokens"] for p in mine), default=float("nan")))
tally.same("lr", 0.5)
result = tally.reduce()
if rank == 0:
    print(json.dumps(result), flush=True)
distributed.teardown()
os._exit(0)
"""


def test_a_tally_over_two_processes_is_the_tally_of_the_whole_step(tmp_path):
    """Metrics reduced over processes: token-weighted means, counts, extremes, as one process computes them."""
    script = tmp_path / "tally.py"
    script.write_text(TALLY)
    parts = json.dumps([{"loss": 1.0, "tokens": 3}, {"loss": 2.0, "tokens": 1}, {"loss": 4.0, "tokens": 4}])
    results = []
    for processes in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes > 1 else []
        done = subprocess.run([sys.executable, *launcher, str(script), parts], capture_output=True, text=True,
                              cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1].replace("NaN", "null")))
    one, two = results
    assert one == two
    assert one == {"loss": (3 + 2 + 16) / 8, "nothing": None, "count": 3, "longest": 4, "shortest": 1, "lr": 0.5}
