"""The exact-match verifier (BIG-Bench Hard): final answers extracted from chains of thought, normalised
targets, per-row dispatch, and the 6,511 BBH targets scoring 100% when given back as responses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd.core.data import Problem, load_problems
from opsd.verifiers import VerifierConfig, Verifiers, check_problems
from opsd.verifiers.exact_match import (
    answers_match,
    extract_final_answer,
    normalize,
    option_letter,
    options_of,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BBH = SHARED / "bbh_test.jsonl"
OPTIONS = "Which day?\nOptions:\n(A) Monday\n(B) Tuesday\n(C) Monsters, Inc\n"


@pytest.mark.parametrize("response,expected", [
    ("Let's think step by step. ... So the answer is (B).", "(B)"),
    ("So the answer is False.", "False"),
    ("step 1\nstep 2\nSo the answer is: valid", "valid"),
    ("The answer is (A). Wait, no. So the answer is (C).", "(C)"),
    ("**Answer:** (D)", "(D)"),
    ("**Final Answer**: yes", "yes"),
    ("reasoning...\nAnswer: ] ] >", "] ] >"),
    ("the correct option is (E)", "(E)"),
    ("We get \\boxed{42} in the end.", "42"),
    ("So the answer is 7.\nthen \\boxed{8}", "8"),  # whichever comes last
    ("<think>So the answer is (A).</think>So the answer is (B).", "(B)"),
    ("<think>So the answer is (A).", None),  # unclosed thinking states no answer
    ("no marker here\nbut a last line\n\n", "but a last line"),
    ("", None),
])
def test_final_answer_extraction(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize("left,right", [
    ("True", "true"), ("  Yes. ", "yes"), ("**valid**", "valid"), ('"no"', "no"),
    ("[apple, Pear, kiwi]", "apple pear kiwi"), ("apple, pear", "apple pear"),
    ("]]>", "] ] >"), (") >", ")>"), ("-11,520", "-11520"), ("Monsters, Inc.", "monsters inc"),
])
def test_normalization_identifies(left, right):
    assert normalize(left) == normalize(right)


@pytest.mark.parametrize("left,right", [("valid", "invalid"), ("] ]", "] ] >"), ("apple pear", "pear apple"),
                                        ("yes", "no"), ("12", "13")])
def test_normalization_keeps_apart(left, right):
    assert normalize(left) != normalize(right)


@pytest.mark.parametrize("predicted,gold,correct", [
    ("(B)", "(B)", True), ("B", "(B)", True), ("b)", "(B)", True), ("(B) Tuesday", "(B)", True),
    ("Option B", "(B)", True), ("Tuesday", "(B)", True), ("(A)", "(B)", False), ("Monday", "(B)", False),
    ("(C)", "(C)", True), ("Monsters, Inc", "(C)", True), ("Monsters, Inc", "Monsters, Inc", True),
    ("24.0", "24", True), ("-11,520", "-11520", True), ("25", "24", False),
    ("valid", "invalid", False), ("", "valid", False), (None, "valid", False),
])
def test_answers_match(predicted, gold, correct):
    assert answers_match(predicted, gold, OPTIONS) is correct


HEDGY = "Which?\nOptions:\n(A) Maybe tomorrow\n(B) Tuesday\n(C) Not sure yet\n(D) Wrong way\n"


@pytest.mark.parametrize("answer,letter", [
    ("(A) or (D)", None), ("(A) and (B)", None), ("A or B", None), ("A/B", None), ("B, not C", None),
    ("(B), not (C)", None), ("either (A) or (B)", None), ("probably (B)", None), ("not (C)", None),
    ("(B), but I am not sure", None), ("(B) is not correct", None), ("(B) is wrong, it is (D)", None),
    ("(B) I think", None), ("B maybe", None),
    ("(B)", "B"), ("(B) Tuesday", "B"), ("(A) Maybe tomorrow", "A"), ("(C) Not sure yet", "C"), ("(D) Wrong way", "D"),
    ("Option (B) because the second paragraph says so", "B"), ("B.", "B"), ("(B) (B)", "B"),
])
def test_a_hedged_or_multi_option_answer_names_no_option(answer, letter):
    """As in the math verifier: naming several options, or hedging or retracting the one named, is no answer
    (the option's own text may hold any word)."""
    assert option_letter(answer, HEDGY) == letter


def test_listing_every_option_scores_nothing_on_bbh():
    """A policy that names every option would otherwise score 100% on multiple choice."""
    problems = [p for p in bbh_problems() if p.answer.startswith("(") and len(options_of(p.problem)) > 1]
    every = lambda p: " or ".join(f"({letter})" for letter in options_of(p.problem))
    responses = [f"So the answer is {every(p)}." for p in problems]
    with Verifiers(VerifierConfig()) as verifiers:
        verdicts = verifiers.verify(responses, problems)
    assert len(problems) > 3000 and not any(v.correct for v in verdicts)


def test_option_letter_reads_letters_and_option_texts():
    assert option_letter("(B).", OPTIONS) == "B" and option_letter("tuesday", OPTIONS) == "B"
    assert option_letter("Wednesday", OPTIONS) is None


def bbh_row(answer: str, **extra) -> Problem:
    return Problem("q", OPTIONS, answer, None, {"verifier": "exact_match", "task": "date", **extra})


def test_dispatch_by_row_needs_no_opt_in_and_grades():
    problems = [bbh_row("(B)"), bbh_row("(B)"), bbh_row("True")]
    check_problems(problems, "bbh.jsonl", VerifierConfig())  # exact match runs no code: no opt-in
    with Verifiers(VerifierConfig()) as verifiers:
        verdicts = verifiers.verify(["So the answer is (B).", "So the answer is (A).", "so the answer is true"],
                                    problems)
    assert [v.correct for v in verdicts] == [True, False, True]
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0] and verdicts[0].extracted == "(B)"


def bbh_problems() -> list[Problem]:
    if not BBH.is_file():
        pytest.skip(f"{BBH} not present")
    return load_problems(BBH)


def test_bbh_file_loads_with_27_tasks():
    problems = bbh_problems()
    assert len(problems) == 6511 and len({p.extra["task"] for p in problems}) == 27
    assert all(p.extra["verifier"] == "exact_match" and p.answer for p in problems)


@pytest.mark.parametrize("template", ["{gold}", "Let's think step by step.\nStep one.\nSo the answer is {gold}.",
                                      "**Answer:** {gold}", "The answer is: {gold}"])
def test_bbh_gold_answers_score_100_percent(template):
    problems = bbh_problems()
    with Verifiers(VerifierConfig()) as verifiers:
        verdicts = verifiers.verify([template.format(gold=p.answer) for p in problems], problems)
    wrong = [(p.id, p.answer, v.extracted) for p, v in zip(problems, verdicts) if not v.correct]
    assert not wrong, wrong[:5]


def test_bbh_another_rows_gold_scores_only_when_equal():
    problems = bbh_problems()
    shifted = [problems[i + 1] for i in range(len(problems) - 1)]
    with Verifiers(VerifierConfig()) as verifiers:
        verdicts = verifiers.verify([f"So the answer is {p.answer}." for p in shifted], problems[:-1])
    for problem, other, verdict in zip(problems, shifted, verdicts):
        same = normalize(problem.answer) == normalize(other.answer)
        assert verdict.correct is same, (problem.id, problem.answer, other.answer)


def test_bbh_rows_load_through_rlvr_style_loading(tmp_path):
    rows = [{"id": "x", "problem": OPTIONS, "answer": None, "verifier": "exact_match", "task": "t"}]
    path = tmp_path / "bbh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from opsd.core.errors import UserError

    with pytest.raises(UserError, match="line 1 has no 'answer'"):  # exact match needs its target
        load_problems(path, require_answer=True)


PIECES = ["So the answer is ", "Answer:", "**", "(A)", "(B)", " ", "\n", ".", "\\boxed{", "}", "<think>", "</think>",
          "answer is", "final answer", "yes", "[", "]", ",", ">", "Option ", "x" * 500, "is"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=2_000), st.lists(st.sampled_from(PIECES), max_size=80).map("".join)))
def test_extraction_and_matching_are_total_and_fast(text):
    started = time.perf_counter()
    answer = extract_final_answer(text)
    assert answer is None or isinstance(answer, str)
    answers_match(answer, "(B)", OPTIONS)
    answers_match(answer, "valid", "")
    assert time.perf_counter() - started < 1.0
