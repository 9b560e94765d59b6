"""Property-based fuzzing of answer extraction and the sandboxed grader: random and adversarial text
(deep nesting, huge numbers, unbalanced braces, LaTeX fragments) never raises and never exceeds the
time budget."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd.verifiers.answer import extract_answer
from opsd.verifiers.math import normalize_answer
from opsd.verifiers.worker import Grader

PIECES = ["\\boxed{", "\\fbox{", "{", "}", "(", ")", "[", "]", "\\frac{", "\\sqrt{", "^{", "_", "\\left(", "\\right)",
          "Answer: ", "#### ", "\n", " ", "$", "\\", "9" * 40, "10^{", "2^{2^{", "e", "x", "=", ",", ".", "-", "+",
          "\\infty", "\\pi", "0.5", "1/3", "%", "\\text{", "\\dfrac", "&", "\\\\",
          "The answer is ", "the final answer is: ", "So the answer is ", "**Answer:** ", "<think>",
          "</think>", " (because ", " or ", "probably ", ". ", "\\begin{pmatrix}", "\\end{pmatrix}",
          "\\left.", "\\$", "$$", "\\(", "\\)", "\\[", "\\]", "**", "dollars", " the "]
latexish = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)
nested = st.builds(lambda opener, depth, inner: opener * depth + inner,
                   st.sampled_from(["\\boxed{", "{", "(", "\\frac{", "^{"]), st.integers(0, 20_000), latexish)
huge_number = st.builds(lambda digits, power: f"\\boxed{{{'9' * digits}^{{{power}}}}}",
                        st.integers(1, 50_000), st.integers(0, 10**12))
hostile = st.one_of(st.text(max_size=2_000), latexish, nested, huge_number)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile)
def test_extraction_is_total_and_fast(text):
    started = time.perf_counter()
    answer = extract_answer(text)
    if answer is not None:
        assert isinstance(answer, str)
        normalize_answer(answer)
    assert time.perf_counter() - started < 1.0


# Text with no thinking tags, for the properties below.
plain = st.lists(st.sampled_from([p for p in PIECES if "think>" not in p]), max_size=40).map("".join)


@settings(max_examples=200, deadline=None)
@given(thinking=plain, after=plain)
def test_closed_thinking_never_matters(thinking, after):
    assert extract_answer(f"<think>{thinking}</think>{after}") == extract_answer(after)
    assert extract_answer(f"{after}<think>{thinking}") == extract_answer(after)


COMMENT_WORDS = ["after", "subtracting", "the", "42", "used", "7", "+", "=", "x", "from", "step", "3.5",
                 "\\frac{1}{2}", "$9$", "minus", "total", "(", ")"]
comment = st.lists(st.sampled_from(COMMENT_WORDS), min_size=1, max_size=12).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**6), remark=comment,
       form=st.sampled_from(["Answer: {n} ({c})", "Answer: {n}, because {c}", "Answer: {n}. The {c}",
                             "The answer is {n} since {c}", "\\boxed{{{n} (from {c})}}"]))
def test_commentary_never_contributes(n, remark, form):
    assert extract_answer(form.format(n=n, c=remark)) == str(n)


TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=TIMEOUT_S) as g:
        yield g


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(response=hostile, gold=st.one_of(latexish, st.sampled_from(["3", "\\frac{1}{2}", "10^{100}", "x^2+1"])))
def test_grader_never_raises_and_keeps_its_time_budget(grader, response, gold):
    started = time.perf_counter()
    verdict = grader.grade_one(response, gold)
    assert isinstance(verdict, bool)
    # a comparison that runs past the budget gets the worker killed and restarted (about 1 s here)
    assert time.perf_counter() - started < TIMEOUT_S + 10.0
