"""Budget forcing (`opsd eval budgets=[...]`, opsd/stages/budgets.py): where a response is cut and what is
appended, for a thinking tokenizer (Qwen3's template, special <think> tokens) and a plain one, and the
accuracy-against-budget rows an evaluation writes, equal on two processes to one."""

import json
from pathlib import Path

from opsd.cli import main
from opsd.core.tiny import char_tokenizer, thinking_tokenizer
from opsd.stages.budgets import forced_prefix

ROOT = Path(__file__).resolve().parents[2]
ARITHMETIC = ROOT / "configs/examples/arithmetic.jsonl"
CUE = " The final answer is "


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_thinking_response_is_cut_inside_its_thinking_and_closed_before_the_cue():
    tokenizer = thinking_tokenizer()
    response = ids(tokenizer, "<think>12+5=17, so</think>Answer: 17<|im_end|>")
    close = response.index(tokenizer.convert_tokens_to_ids("</think>"))
    assert forced_prefix(tokenizer, response, close + 1, CUE) is None  # its thinking fits: kept whole
    cut = forced_prefix(tokenizer, response, 4, CUE)
    assert cut[:4] == response[:4] and tokenizer.decode(cut) == "<think>12+\n</think>\n\n" + CUE
    # a response that never thinks is cut like a plain one: no </think> to add
    plain = ids(tokenizer, "The sum is 17.<|im_end|>")
    assert forced_prefix(tokenizer, plain, len(plain), CUE) is None
    assert tokenizer.decode(forced_prefix(tokenizer, plain, 3, CUE)) == "The" + CUE


def test_a_plain_response_is_cut_at_the_budget_whole_stop_token_included():
    tokenizer = char_tokenizer()
    response = ids(tokenizer, "12 + 5 = 17<|im_end|>")
    assert forced_prefix(tokenizer, response, len(response), CUE) is None
    assert tokenizer.decode(forced_prefix(tokenizer, response, len(response) - 1, CUE)) == "12 + 5 = 17" + CUE


def test_an_evaluation_reports_accuracy_against_budget_and_two_processes_agree(tmp_path, capsys):
    """Budget 12 (the response budget) cuts nothing and equals the evaluation itself; budget 2 cuts every
    response the tiny model does not end in 2 tokens; two processes write the same rows."""
    import os
    import subprocess
    import sys

    args = ["eval", f"data=[{ARITHMETIC}]", "sampling.n=2", "sampling.max_new_tokens=12", "limit=4", "run.threads=1",
            "budgets=[2,12]", "budget_answer_tokens=3"]
    assert main([*args, f"run.output_dir={tmp_path / 'one'}"]) == 0
    assert "| thinking budget |" in capsys.readouterr().out
    row = json.loads((tmp_path / "one/eval.json").read_text())["benchmarks"][0]
    short, whole = row["budgets"]
    assert (short["budget"], whole["budget"]) == (2, 12)
    assert whole["cut_rate"] == 0 and whole["mean_at_k"] == row["mean_at_k"]
    assert whole["response_tokens_mean"] == row["response_tokens_mean"]
    assert short["cut_rate"] > 0 and short["response_tokens_mean"] <= 2 + 3
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "opsd.cli", *args, f"run.output_dir={tmp_path / 'two'}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two/eval.json").read_text())["benchmarks"][0]["budgets"] == row["budgets"]


def test_a_budget_past_the_response_budget_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", f"data=[{ARITHMETIC}]", "sampling.max_new_tokens=12", "budgets=[16]",
                 f"run.output_dir={out}"]) == 2
    assert "budgets must be at most the response budget of arithmetic (12 new tokens)" in capsys.readouterr().err
    assert not out.exists()
