"""`opsd sft` end to end on the local tiny model: the loss is on response tokens and goes down."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opsd.cli import main
from opsd.core.tiny import char_tokenizer
from opsd.stages.sft import tokenize_pairs

ROOT = Path(__file__).resolve().parents[2]


def pairs_file(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in (ROOT / "configs/examples/arithmetic.jsonl").read_text().splitlines()]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"problem": r["problem"], "response": r["solution"]}) + "\n" for r in rows))
    return path


def test_targets_are_the_response_and_eos_only():
    tok = char_tokenizer()
    (prompt, target), = tokenize_pairs([("Compute 1 + 2.", "3")], tok, max_length=512)[0]
    assert tok.decode(prompt).endswith("assistant\n")
    assert target == tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    examples, cut = tokenize_pairs([("Compute 1 + 2.", "x" * 100)], tok, max_length=len(prompt) + 10)
    assert cut == 1 and len(examples[0][0]) + len(examples[0][1]) == len(prompt) + 10


def test_sft_learns_the_responses(tmp_path):
    out = tmp_path / "sft"
    code = main(["sft", str(ROOT / "configs/sft-tiny.yaml"), f"data.path={pairs_file(tmp_path)}",
                 f"run.output_dir={out}", "run.steps=30", "run.report_to=[]"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss/nll"], sum(r["loss/nll"] for r in rows[-5:]) / 5
    assert first > 3.0 and last < 0.6 * first, (first, last)
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000030")
    assert torch.isfinite(next(model.parameters())).all()


def test_sft_refuses_rows_without_a_response(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x", "response": "y"}) + "\n" + json.dumps({"problem": "x"}) + "\n")
    assert main(["sft", str(ROOT / "configs/sft-tiny.yaml"), f"data.path={bad}",
                 f"run.output_dir={tmp_path / 'o'}"]) == 2
    assert "bad.jsonl line 2 has no 'response'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_token_budget_gives_the_padded_step(tmp_path):
    """optim.micro_batch_tokens: the step's pairs packed back to back by a token budget, without padding, give
    the loss and gradient norm of padded micro-batches of 16, within float error."""
    def first_step(name: str, *options: str) -> dict:
        out = tmp_path / name
        assert main(["sft", str(ROOT / "configs/sft-tiny.yaml"), f"data.path={pairs_file(tmp_path)}",
                     f"run.output_dir={out}", "run.steps=1", "run.report_to=[]", *options]) == 0
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    padded, flat = first_step("padded"), first_step("flat", "optim.micro_batch_tokens=300")
    assert flat["loss/nll"] == pytest.approx(padded["loss/nll"], rel=1e-5)
    assert flat["optim/grad_norm"] == pytest.approx(padded["optim/grad_norm"], rel=1e-5)
