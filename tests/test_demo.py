"""`opsd demo --quick`: every stage of the built-in pipeline runs and the summary has every field."""

import json

from opsd.cli import main
from opsd.demo import SHIPPED_SFT
from opsd import toyworld


def test_shipped_sft_checkpoint_is_a_model_folder():
    assert (SHIPPED_SFT / "model.safetensors").is_file() and (SHIPPED_SFT / "tokenizer.json").is_file()
    info = json.loads((SHIPPED_SFT / "opsd_checkpoint.json").read_text())
    assert info["stage"] == "sft"


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "pipeline" / "summary.json").read_text())
    assert [(r["stage"], r["start"]) for r in summary["rows"]] == [("sft", ""), ("rlvr", "sft"), ("opsd", "rlvr")]
    for row in summary["rows"]:
        (bench,) = row["benchmarks"]
        assert bench["problems"] == 10 * len(toyworld.LEVELS)
        for key in ("mean_at_k", "mean_at_k_stderr", "maj_at_k", "response_tokens_mean", "correct_response_tokens_mean",
                    "compression", "truncation_rate", "markers_per_1k_tokens"):
            assert key in bench, key
        assert [level["level"] for level in bench["levels"]] == [str(level) for level in toyworld.LEVELS]
    printed = capsys.readouterr().out
    assert "| opsd | rlvr | heldout |" in printed and "standard error" in printed
