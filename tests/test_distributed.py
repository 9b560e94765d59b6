"""The same loop under torchrun: two CPU processes (gloo), DDP-wrapped student, rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_train_and_write_one_run_folder(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               "-m", "opsd.cli", "distill", str(ROOT / "configs/tiny.yaml"), f"run.output_dir={out}", "run.steps=2",
               "sampling.max_new_tokens=8", "run.tensorboard=false", "gating=correct_and_truncated",
               "optim.micro_batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["rollout/count"] == 8  # rank 0's half of 8 problems × 2 samples
    assert (out / "checkpoints" / "step_000002" / "model.safetensors").is_file()
