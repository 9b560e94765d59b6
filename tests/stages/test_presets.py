"""Every published setting loads and runs two steps on the local tiny model through size overrides."""

import json
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.core.config import load_config
from opsd.stages.distill import DistillConfig
from opsd.stages.rlvr import RLVRConfig

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs/presets").glob("*.yaml"))
TINY = ["model.name_or_path=builtin:tiny", f"data.path={ROOT / 'configs/examples/arithmetic.jsonl'}",
        "sampling.max_new_tokens=8", "run.steps=2", "run.problems_per_step=2", "run.save_every=0",
        "run.report_to=[]", "optim.gradient_checkpointing=false"]


def test_the_presets_are_there():
    assert {p.stem for p in PRESETS} == {"opsd", "opsdc", "opsd_compresses", "purified_opsd", "rlvr_dapo"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_runs_two_steps_on_the_tiny_model(preset, tmp_path):
    command = "rlvr" if preset.stem.startswith("rlvr") else "distill"
    load_config(RLVRConfig if command == "rlvr" else DistillConfig, preset, [])  # as shipped
    extra = ["sampling.n=2", "grpo.overlong_buffer=4"] if command == "rlvr" else []
    out = tmp_path / preset.stem
    assert main([command, str(preset), *TINY, *extra, f"run.output_dir={out}"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    config = json.dumps((out / "config.yaml").read_text())
    assert "builtin:tiny" in config
