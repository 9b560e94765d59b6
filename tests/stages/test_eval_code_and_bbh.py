"""pass@k against brute-force enumeration; `opsd eval` on code (HumanEval) and exact-match (BBH) rows with
per-task rows and pass@k; `opsd rlvr` and `opsd distill` taking them as data (reward and gating)."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.stages.eval import mean_pass_at_k, pass_at_k

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of the k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_is_stable_for_many_samples():
    for n, c, k in [(200, 1, 100), (200, 3, 10), (1000, 7, 500), (10_000, 1, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is the fraction correct
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_mean_pass_at_k_uses_the_fewest_samples():
    value, k = mean_pass_at_k([[True, False, False], [False, False]])
    assert k == 2 and value == pytest.approx((float(brute_force_pass_at_k(3, 1, 2)) + 0.0) / 2)
    assert math.isnan(mean_pass_at_k([])[0])


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


CODE_ROWS = [
    {"id": "add", "problem": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "answer": None, "verifier": "code",
     "entry_point": "add",
     "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "task": "arithmetic"},
    {"id": "neg", "problem": "def neg(a):\n    \"\"\"Minus a.\"\"\"\n", "answer": None, "verifier": "code",
     "entry_point": "neg",
     "tests": "def check(candidate):\n    assert candidate(2) == -2\n", "task": "arithmetic"},
]
BBH_ROWS = [
    {"id": "b1", "problem": "True and False is", "answer": "False", "verifier": "exact_match",
     "task": "boolean_expressions"},
    {"id": "b2", "problem": "Pick.\nOptions:\n(A) x\n(B) y", "answer": "(B)", "verifier": "exact_match",
     "task": "choices"},
    {"id": "b3", "problem": "Pick.\nOptions:\n(A) x\n(B) y", "answer": "(A)", "verifier": "exact_match",
     "task": "choices"},
]
RESPONSES = [
    ("add", "```python\ndef add(a, b):\n    return a + b\n```"), ("add", "    return a - b\n"),
    ("neg", "    return a\n"), ("neg", "```python\ndef neg(a):\n    while True: pass\n```"),
    ("b1", "Let's think step by step. True and False is False. So the answer is False."), ("b1", "So the answer is "
                                                                                                 "True."),
    ("b2", "So the answer is (B)."), ("b2", "Answer: y"),
    ("b3", "So the answer is (B)."), ("b3", "So the answer is (A)."),
]


def test_eval_prints_per_task_accuracy_and_pass_at_k(tmp_path, capsys):
    code = write_rows(tmp_path / "code.jsonl", CODE_ROWS)
    bbh = write_rows(tmp_path / "bbh.jsonl", BBH_ROWS)
    responses = write_rows(tmp_path / "responses.jsonl", [{"id": i, "response": r} for i, r in RESPONSES])
    out = tmp_path / "eval"
    assert main(["eval", f"data=[{code},{bbh}]", "--responses", str(responses), f"run.output_dir={out}",
                 "verifier.allow_code_execution=true", "verifier.code_timeout_s=2"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    code_row, bbh_row = report["benchmarks"]
    assert code_row["mean_at_k"] == pytest.approx(0.25) and code_row["pass_at_k"] == pytest.approx(0.5)
    assert code_row["pass_k"] == 2 and [t["task"] for t in code_row["tasks"]] == ["arithmetic"]
    assert code_row["grading"]["code_timeouts"] == 1 and code_row["grading"]["sandbox_errors"] == 0  # `while True`
    assert bbh_row["mean_at_k"] == pytest.approx(4 / 6) and bbh_row["pass_at_k"] == pytest.approx(1.0)
    tasks = {t["task"]: t for t in bbh_row["tasks"]}
    assert tasks["boolean_expressions"]["mean_at_k"] == pytest.approx(0.5)
    assert tasks["choices"]["mean_at_k"] == pytest.approx(0.75) and tasks["choices"]["problems"] == 2
    assert "| bbh · choices | 2 | 4 | 0.750 ± 0.250 | 1.000 (k=2) |" in printed
    assert "pass@k" in printed.splitlines()[0] or any("pass@k" in line for line in printed.splitlines())


def test_eval_on_shared_humaneval_and_bbh_rows(tmp_path, capsys):
    humaneval, bbh = SHARED / "humaneval_test.jsonl", SHARED / "bbh_test.jsonl"
    if not (humaneval.is_file() and bbh.is_file()):
        pytest.skip("../shared/data/humaneval_test.jsonl or bbh_test.jsonl not present")
    code_rows = [json.loads(line) for line in humaneval.read_text().splitlines()[:4]]
    by_task: dict[str, list[dict]] = {}
    for line in bbh.read_text().splitlines():
        row = json.loads(line)
        if len(by_task.setdefault(row["task"], [])) < 2 and len(by_task) <= 3:
            by_task[row["task"]].append(row)
    bbh_rows = [row for rows in list(by_task.values())[:3] for row in rows]
    responses = [{"id": r["id"], "response": f"```python\n{r['problem']}{r['solution']}```"} for r in code_rows]
    responses += [{"id": r["id"], "response": "    return None\n"} for r in code_rows]
    responses += [{"id": r["id"],
                   "response": f"Let's think step by step.\nSo the answer is {r['answer']}."} for r in bbh_rows]
    responses += [{"id": r["id"], "response": "So the answer is (Z)."} for r in bbh_rows]
    files = [write_rows(tmp_path / "humaneval.jsonl", code_rows), write_rows(tmp_path / "bbh.jsonl", bbh_rows)]
    out = tmp_path / "eval"
    assert main(["eval", f"data=[{files[0]},{files[1]}]", f"responses={write_rows(tmp_path / 'r.jsonl', responses)}",
                 f"run.output_dir={out}", "verifier.allow_code_execution=true"]) == 0
    printed = capsys.readouterr().out
    code_row, bbh_row = json.loads((out / "eval.json").read_text())["benchmarks"]
    assert code_row["mean_at_k"] == pytest.approx(0.5) and code_row["pass_at_k"] == pytest.approx(1.0)
    assert bbh_row["mean_at_k"] == pytest.approx(0.5) and len(bbh_row["tasks"]) == 3
    assert all(f"| bbh · {task} | 2 | 4 | 0.500" in printed for task in list(by_task)[:3])


MIXED = [*CODE_ROWS, *BBH_ROWS, {"id": "m", "problem": "What is 2 + 3?", "answer": "5"}]


@pytest.mark.parametrize("command,config,overrides", [
    ("rlvr", "configs/rlvr-tiny.yaml", ["grpo.overlong_buffer=8"]),
    ("distill", "configs/tiny.yaml", ["gating=correct_only", "teacher.context=concise"]),
])
def test_training_commands_take_code_and_exact_match_rows(command, config, overrides, tmp_path):
    data = write_rows(tmp_path / "mixed.jsonl", MIXED)
    out = tmp_path / command
    assert main([command, str(ROOT / config), f"data.path={data}", f"run.output_dir={out}", "run.steps=1",
                 "run.problems_per_step=6", "sampling.max_new_tokens=8", "verifier.allow_code_execution=true",
                 "verifier.code_timeout_s=2", "run.max_empty_steps_in_a_row=2", *overrides]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["rollout/accuracy"] is not None  # every row could be graded
