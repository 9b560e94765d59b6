"""The code verifier (HumanEval): code extraction, the candidate's program and the judge's, verdicts, the
canonical solutions passing and rotated ones failing, and the opt-in. The sandbox's walls and its judge have
their own files (test_sandbox_walls.py, test_sandbox_judge.py)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd.core.data import Problem, load_problems
from opsd.core.errors import UserError
from opsd.verifiers import ANSWER_FREE, VerifierConfig, Verifiers, check_problems
from opsd.verifiers.code import (
    checks_for,
    defines,
    extract_code,
    fenced_blocks,
    program_for,
)

ROOT = Path(__file__).resolve().parents[2]
HUMANEVAL = ROOT.parent / "shared" / "data" / "humaneval_test.jsonl"
ALLOW = VerifierConfig(allow_code_execution=True, code_timeout_s=3.0)
ADD_PROMPT = ('from typing import List\n\n\ndef helper(x):\n    return x\n\n\n'
              'def add(a: int, b: int) -> int:\n    """Sum."""\n')
ADD = Problem("add", ADD_PROMPT, None, "    return a + b\n",
              {"verifier": "code", "entry_point": "add", "tests": "def check(candidate):\n    assert candidate(2, 3) "
                                                                  "== 5\n"})


# --- extraction and the program -------------------------------------------------------------------

FULL = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("response,expected", [
    (f"Here:\n```python\n{FULL}```\nDone.", FULL),
    (f"```python\n{FULL}```\nUsage:\n```python\nprint(add(1, 2))\n```", FULL),  # the block defining it
    ("```python\nx = 1\n```\n```py\ny = 2\n```", "y = 2\n"),  # none defines it: the last
    (f"```\n{FULL}```", FULL),  # a bare fence
    (f"```python\n{FULL}", FULL),  # an unclosed fence runs to the end
    (f"```javascript\nfunction add() {{}}\n```\n```python\n{FULL}```", FULL),
    ("    return a + b\n", "    return a + b\n"),  # a raw completion of the prompt
    ("    return a + b\n\nif __name__ == '__main__':\n    print(add(1, 2))\n", "    return a + b\n\n"),
    (FULL + "\nprint(add(1, 2))\n", FULL + "\nprint(add(1, 2))\n"),  # a full function is kept whole
    (f"<think>```python\nwrong\n```</think>```python\n{FULL}```", FULL),
    ("", ""),
])
def test_code_extraction(response, expected):
    assert extract_code(response, "add") == expected


def test_program_for_body_and_full_function_and_checks_for():
    body = program_for(ADD_PROMPT, "    return a + b\n", "add")
    assert body == ADD_PROMPT + "    return a + b\n"
    flush_left = program_for(ADD_PROMPT, "return a + b", "add")
    assert ADD_PROMPT + "    return a + b\n" in flush_left
    full = program_for(ADD_PROMPT, FULL, "add")
    assert full.count("def add(") == 1 and "def helper(x)" in full and "from typing import List" in full
    tests = checks_for(ADD_PROMPT, "def check(candidate):\n    assert candidate(2, 3) == 5\n")
    assert tests.startswith(ADD_PROMPT) and "check(" in tests and "return a + b" not in tests  # no model code
    for program in (body, flush_left, full, tests):
        compile(program, "program.py", "exec")  # compiled only: model code never runs in this process
    assert defines("async def add(x):\n", "add") and not defines("    def add(x):\n", "add")


# --- grading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("response,correct", [
    ("    return a + b\n", True),
    ("return a + b", True),
    (f"```python\n{FULL}```", True),
    ("```python\ndef add(a, b):\n    return helper(a) + b\n```", True),  # the prompt's helpers stay
    ("    return a - b\n", False),
    ("    import os\n    os._exit(0)\n", False),  # ending early is not passing
    ("    raise SystemExit(0)\n", False),
    ("this is not code", False),
    ("", False),
])
def test_code_verdicts(response, correct):
    with Verifiers(ALLOW) as verifiers:
        verdict, = verifiers.verify([response], [ADD])
    assert verdict.correct is correct and verdict.reward == float(correct)


def humaneval() -> list[Problem]:
    if not HUMANEVAL.is_file():
        pytest.skip(f"{HUMANEVAL} not present")
    problems = load_problems(HUMANEVAL, answer_free=ANSWER_FREE)
    assert len(problems) == 164 and all(p.answer is None for p in problems)
    return problems


def test_humaneval_all_164_canonical_pass_rotated_fail():
    """328 sandboxed programs, two at a time: about 20 s on two busy cores."""
    problems = humaneval()
    config = VerifierConfig(allow_code_execution=True, code_timeout_s=20.0)
    with Verifiers(config) as verifiers:
        canonical = verifiers.verify([p.solution for p in problems], problems)
        rotated = verifiers.verify([problems[(i + 1) % len(problems)].solution for i in range(len(problems))], problems)
        assert verifiers.counters()["sandbox_errors"] == 0
    assert [p.id for p, v in zip(problems, canonical) if not v.correct] == []
    assert [p.id for p, v in zip(problems, rotated) if v.correct] == []


# --- the opt-in and the data ------------------------------------------------------------------------


def test_code_rows_are_refused_without_the_opt_in():
    with pytest.raises(UserError, match=r"set verifier\.allow_code_execution=true"):
        check_problems([ADD], "he.jsonl", VerifierConfig())
    with pytest.raises(UserError, match=r"set eval\.verifier\.allow_code_execution=true"):
        check_problems([ADD], "he.jsonl", VerifierConfig(), option="eval.verifier")
    with Verifiers(VerifierConfig()) as verifiers, pytest.raises(UserError, match="allow_code_execution"):
        verifiers.verify(["    return a + b\n"], [ADD])
    check_problems([ADD], "he.jsonl", ALLOW)
    no_tests = Problem("t", "p", None, None, {"verifier": "code", "entry_point": "f"})
    with pytest.raises(UserError, match="'t' .* has no 'tests'"):
        check_problems([no_tests], "he.jsonl", ALLOW)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def code_row(**extra) -> dict:
    return {"id": "add", "problem": ADD_PROMPT, "answer": None, "solution": ADD.solution, **ADD.extra, **extra}


def test_code_rows_load_without_answers_math_rows_do_not(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl", [code_row(), {"id": "m", "problem": "1+1?", "answer": "2"}])
    assert [p.answer for p in load_problems(path, answer_free=ANSWER_FREE)] == [None, "2"]
    missing = write_rows(tmp_path / "missing.jsonl", [code_row(), {"id": "m", "problem": "1+1?", "answer": None}])
    with pytest.raises(UserError, match="missing.jsonl line 2 has no 'answer'"):
        load_problems(missing, answer_free=ANSWER_FREE)
    no_field = write_rows(tmp_path / "nofield.jsonl", [{k: v for k, v in code_row().items() if k != "verifier"}])
    with pytest.raises(UserError, match="line 1 has no 'answer'"):
        load_problems(no_field, answer_free=ANSWER_FREE)
    assert load_problems(no_field, default_verifier="code", answer_free=ANSWER_FREE)[0].answer is None


@pytest.mark.parametrize("command", ["eval", "rlvr", "distill", "pipeline-eval", "pipeline-stage"])
def test_every_command_refuses_code_rows_without_the_opt_in(command, tmp_path, capsys):
    from opsd.cli import main

    data = write_rows(tmp_path / "he.jsonl", [code_row()])
    out = tmp_path / "out"
    if command == "eval":
        responses = write_rows(tmp_path / "r.jsonl", [{"id": "add", "response": "    return a + b\n"}])
        argv, option = ["eval", f"data=[{data}]", f"responses={responses}", f"run.output_dir={out}"], "verifier"
    elif command in ("rlvr", "distill"):
        config = ROOT / "configs" / ("rlvr-tiny.yaml" if command == "rlvr" else "tiny.yaml")
        argv, option = [command, str(config), f"data.path={data}", f"run.output_dir={out}"], "verifier"
    elif command == "pipeline-eval":
        argv = ["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"eval.data=[{data}]", f"run.output_dir={out}"]
        option = "eval.verifier"
    else:
        stages = [{"name": "rl", "command": "rlvr", "config": str(ROOT / "configs/rlvr-tiny.yaml"),
                   "overrides": [f"data.path={data}"]}]
        config = tmp_path / "pipeline.yaml"
        config.write_text(json.dumps({"stages": stages,
                                      "eval": {"data": [str(ROOT / "configs/examples/arithmetic.jsonl")]},
                                      "run": {"output_dir": str(out)}}))
        argv, option = ["pipeline", str(config)], "verifier"
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and f"set {option}.allow_code_execution=true" in message, message
    assert not out.exists()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["```", "```python\n", "def add(", "    return 1\n", "\n", "if __name__", "<think>",
                                 "</think>", "print(", "x" * 1000, " "]), max_size=60).map("".join))
def test_code_extraction_is_total_and_fast(text):
    started = time.perf_counter()
    code = extract_code(text, "add")
    compile_or_fail = program_for(ADD_PROMPT, code, "add")
    assert isinstance(compile_or_fail, str) and time.perf_counter() - started < 1.0


# the fence rule as one regular expression, which backtracks quadratically on a long unclosed fence line
FENCE_AS_REGEX = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["```", "```python", "```py x", " ```", "\t```", "\n", "a", "def f():", " ", "``",
                                 "x\n", "python", "\n\n"]), max_size=14).map("".join))
def test_fenced_blocks_follow_the_fence_rule(text):
    assert fenced_blocks(text) == [(m.group(1), m.group(2)) for m in FENCE_AS_REGEX.finditer(text)]


def test_extraction_is_linear_on_a_long_unclosed_fence():
    """An independent red team's response ("```" and 200,000 letters, no newline) took 14 s in the trainer's
    process with the regular expression; one pass over the lines takes microseconds."""
    started = time.perf_counter()
    for text in ("```" + "a" * 200_000, "```\n" + "```" * 100_000, "\n".join(["```x"] * 50_000)):
        extract_code(text, "f")
    assert time.perf_counter() - started < 1.0
