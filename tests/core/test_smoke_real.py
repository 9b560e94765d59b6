"""Slow smoke test on a real pretrained chat model (SmolLM2-135M-Instruct) with its own tokenizer.

Run with `python -m pytest -m slow`. The checkpoint is built offline by ../shared/tools/smollm2-checkpoint
(skipped when the tool is not there) into OPSD_SMOLLM2_DIR or a cache folder.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from opsd.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT.parent / "shared" / "tools" / "smollm2-checkpoint"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    folder = Path(os.environ.get("OPSD_SMOLLM2_DIR", Path.home() / ".cache" / "opsd-tests" / "smollm2"))
    if not (folder / "model.safetensors").is_file():
        if not TOOL.is_file():
            pytest.skip(f"{TOOL} is not available")
        result = subprocess.run(["bash", str(TOOL), str(folder)], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"could not build the SmolLM2 checkpoint: {result.stderr[-300:]}")
    return folder


@pytest.mark.slow
def test_distill_a_real_model_on_gsm8k(tmp_path, smollm2):
    data = tmp_path / "gsm8k.jsonl"
    if GSM8K.is_file():
        data.write_text("".join(GSM8K.read_text().splitlines(keepends=True)[:8]))
    else:
        data.write_text((ROOT / "configs/examples/arithmetic.jsonl").read_text())
    out = tmp_path / "run"
    code = main([
        "distill", str(ROOT / "configs/tiny.yaml"), f"model.name_or_path={smollm2}", f"data.path={data}",
        f"run.output_dir={out}", "run.steps=2", "run.problems_per_step=2", "sampling.n=2",
        "sampling.max_new_tokens=48", "optim.micro_batch_size=2", "optim.lr=1e-5", "optim.chunk_size=32",
        "teacher.context=reference", "loss.kind=jsd", "loss.clip_tau=0.05", "loss.temperature=1.1",
    ])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss/divergence"] > 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000002")
    assert model.config.vocab_size > 40_000
