"""The generated demo world: determinism, levels, renderings, grading, held-out disjointness, tokenizer."""

from __future__ import annotations

import random
import statistics

import pytest

from opsd.core.data import Problem, load_problems
from opsd.core.prompts import render_prompt
from opsd.core.tiny import char_tokenizer
from opsd.demo.toyworld import (
    ALPHABET,
    HELD_OUT_PER_LEVEL,
    LEVELS,
    ToyProblem,
    concise_solution,
    held_out,
    held_out_texts,
    level_capacity,
    make_problem,
    problem_rows,
    problems,
    running_values,
    sft_rows,
    to_problem,
    verbose_solution,
    write_jsonl,
)
from opsd.teacher.contexts import CONCISE_INSTRUCTION, teacher_user_message
from opsd.verifiers.answer import extract_answer
from opsd.verifiers.worker import Grader


def _sample(n_per_level: int, seed: int = 0) -> list[ToyProblem]:
    rng = random.Random(seed)
    return [make_problem(rng, level) for level in LEVELS for _ in range(n_per_level)]


def _naive_capacity(level: int) -> int:
    """Enumerate every chain outright (reference for the dynamic-programming count)."""
    chains = [[v] for v in range(1, 10)]
    for _ in range(level):
        chains = [c + [c[-1] + d] for c in chains for d in (*range(1, 10), *range(-9, 0)) if 0 <= c[-1] + d <= 99]
    return len(chains)


def test_deterministic_in_the_seed():
    assert problems(100, seed=3) == problems(100, seed=3)
    assert problems(100, seed=3) != problems(100, seed=4)
    assert sft_rows(50, seed=3) == sft_rows(50, seed=3)
    assert held_out() == held_out()
    a, b = _sample(5), _sample(5)
    assert [verbose_solution(p, random.Random(1)) for p in a] == [verbose_solution(p, random.Random(1)) for p in b]


def test_levels_and_running_values():
    for p in _sample(200):
        values = running_values(p)
        assert len(p.steps) == p.level and p.problem.count(" + ") + p.problem.count(" - ") == p.level
        assert 1 <= p.start <= 9 and all(op in "+-" and 1 <= b <= 9 for op, b in p.steps)
        assert all(0 <= v <= 99 for v in values) and p.answer == str(values[-1])
        assert p.problem == "Compute " + " ".join([str(p.start)] + [f"{op} {b}" for op, b in p.steps]) + "."
    assert [level_capacity(level) for level in (1, 2, 3)] == [_naive_capacity(level) for level in (1, 2, 3)]


def test_problems_are_unique_balanced_and_fill_short_levels():
    items = problems(200, seed=0)
    assert len({p.problem for p in items}) == 200 and len({p.id for p in items}) == 200
    assert [sum(p.level == level for p in items) for level in LEVELS] == [200 // len(LEVELS)] * len(LEVELS)
    assert {p.level for p in problems(30, seed=0, levels=(2, 4))} == {2, 4}
    # Level 1 has 126 distinct problems: it gives them all and the other levels make up the rest.
    big = problems(1000, seed=0)
    assert sum(p.level == 1 for p in big) == 126 and len(big) == 1000
    with pytest.raises(ValueError, match="126"):
        problems(127, seed=0, levels=(1,))


def test_held_out_is_disjoint_from_training_and_rlvr_sets():
    evaluation = held_out()
    assert [sum(p.level == level for p in evaluation) for level in LEVELS] == [HELD_OUT_PER_LEVEL] * len(LEVELS)
    texts = held_out_texts()
    assert len(texts) == 200
    rlvr = problems(1000, seed=1, exclude=texts)
    sft = sft_rows(2000, seed=2, exclude=texts)
    assert not texts & {p.problem for p in rlvr}
    bare = {r["problem"].rsplit("\n\n", 1)[-1] for r in sft}
    assert not texts & bare
    # Level 1 keeps 126 - 50 = 76 problems outside the held-out set.
    assert sum(p.level == 1 for p in problems(1000, seed=1, exclude=texts)) == 126 - HELD_OUT_PER_LEVEL


def test_renderings_and_lengths():
    example = ToyProblem("L2:7+5-3", "Compute 7 + 5 - 3.", 7, (("+", 5), ("-", 3)), "9", 2)
    assert concise_solution(example) == "7+5=12. 12-3=9.\nAnswer: 9"
    assert verbose_solution(example, random.Random(0), p_detour=0.0, p_fix=0.0) == (
        "We start at 7 and apply +5, then -3.\nStep 1: 7+5=12. Check: 12-5=7, ok.\n"
        "Step 2: 12-3=9. Check: 9+3=12, ok.\nSo the result is 9.\nAnswer: 9"
    )
    fixed = verbose_solution(example, random.Random(0), p_detour=1.0, p_fix=1.0)
    assert fixed.count("Wait, that is wrong.") == 2 and fixed.count("Wait, let me recompute") == 2
    rng = random.Random(0)
    for level in LEVELS:
        items = [make_problem(rng, level) for _ in range(300)]
        verbose = statistics.mean(len(verbose_solution(p, rng)) for p in items)
        concise = statistics.mean(len(concise_solution(p)) for p in items)
        assert verbose >= 4 * concise and verbose <= 350


def test_answers_are_extracted_and_graded():
    items = _sample(60)
    rng = random.Random(0)
    responses = [verbose_solution(p, rng, p_detour=0.5, p_fix=0.5) for p in items]
    responses += [concise_solution(p) for p in items]
    golds = [p.answer for p in items] * 2
    assert [extract_answer(r) for r in responses] == golds
    assert all(extract_answer(to_problem(p).solution or "") == p.answer for p in items)
    wrong = [r.rsplit("Answer: ", 1)[0] + f"Answer: {int(g) + 1}" for r, g in zip(responses[:20], golds)]
    with Grader(timeout_s=10.0) as grader:
        assert all(grader.grade(responses, golds))
        assert not any(grader.grade(wrong, golds[:20]))


def test_sft_rows_use_the_concise_teacher_prompt():
    rows = sft_rows(200, seed=0, concise_fraction=0.25)
    concise = [r for r in rows if r["problem"].startswith(CONCISE_INSTRUCTION)]
    assert len(concise) == 50 and len({r["id"] for r in rows}) == 200
    for row in rows:
        bare = row["problem"].rsplit("\n\n", 1)[-1]
        assert bare.startswith("Compute ") and row["level"] == bare.count(" + ") + bare.count(" - ")
        if row in concise:
            expected = teacher_user_message(Problem("x", bare, None), "concise", "", CONCISE_INSTRUCTION)
            assert row["problem"] == expected == f"{CONCISE_INSTRUCTION}\n\n{bare}"
            assert "Check" not in row["response"]
        else:
            assert row["problem"] == bare and "Check:" in row["response"]


def test_problem_rows_load_with_the_shared_loader(tmp_path):
    items = problems(20, seed=5)
    path = write_jsonl(problem_rows(items), tmp_path / "sub" / "toy.jsonl")
    loaded = load_problems(path)
    assert [(p.id, p.problem, p.answer, p.solution, p.extra) for p in loaded] == [
        (t.id, t.problem, t.answer, concise_solution(t), {"level": t.level}) for t in items
    ]
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_alphabet_covers_everything_and_tokenizes_round_trip():
    tokenizer = char_tokenizer(ALPHABET)
    rng = random.Random(0)
    items = _sample(40)
    texts = [CONCISE_INSTRUCTION] + [r["problem"] + r["response"] for r in sft_rows(200, seed=0)]
    texts += [verbose_solution(p, rng, 1.0, 1.0) + concise_solution(p) for p in items]
    contexts = ("reference", "answer", "concise")
    texts += [teacher_user_message(to_problem(p), c, "", CONCISE_INSTRUCTION) for p in items[:5] for c in contexts]
    for text in texts:
        assert set(text) <= set(ALPHABET)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    message = teacher_user_message(to_problem(items[0]), "concise", "", CONCISE_INSTRUCTION)
    ids = render_prompt(tokenizer, message)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
