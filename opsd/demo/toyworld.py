"""A generated reasoning world for the built-in demo: left-to-right chains of small additions and subtractions.

"Compute 7 + 5 - 3." The level (1..4) is the number of operations and is the difficulty knob: errors add
up per step, so accuracy falls with the level, which gives RLVR a gradient to climb. Operands and the
starting value are single digits and the running value stays in 0..99 (in fact 0..54), so a
~1M-parameter character-level model can learn the arithmetic on a CPU (see
`../shared/notes/toyworld-feasibility.md`: two-digit operands were out of reach in a few hundred steps).

Each problem has two renderings of one computation:
- verbose (the student's default, "thinking"): restates the plan, checks every step by the inverse
  operation, sometimes recomputes a step (a detour) or states a wrong result and corrects it;
- concise (after the conciseness instruction): the bare chain "7+5=12. 12-3=9.\nAnswer: 9".
Both write a step as "a+b=c" without spaces, so the arithmetic looks the same in both styles and only
the verbose-only lines differ: that is where the OPSD teacher signal should sit. Both end with an
`Answer: N` line, which `opsd.verifiers.answer.extract_answer` reads.

Sampling is uniform over the distinct problems of a level (exact counts by dynamic programming), so
`level_capacity` is exact and drawing unique problems by rejection stays cheap even when a level runs
low (level 1 has only 126 distinct problems). Everything is a pure function of its seed.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from opsd.core.data import Problem
from opsd.teacher.contexts import CONCISE_INSTRUCTION, teacher_user_message

# Every character the problems, both renderings and the prompt/teacher templates use; the demo's
# tokenizer is `opsd.core.tiny.char_tokenizer(ALPHABET)` (79 tokens with the 4 special ones).
ALPHABET = string.digits + string.ascii_letters + " \n" + "+-=.,:!?'()"
LEVELS = (1, 2, 3, 4)  # five operations make verbose rollouts too long for the CPU demo's budget
DIGITS = range(1, 10)  # operands and starting values
MAX_VALUE = 99  # the running value stays in 0..MAX_VALUE
HELD_OUT_SEED = 20_260_611  # the held-out evaluation set; other sets exclude it by problem text
HELD_OUT_PER_LEVEL = 50


@dataclass(frozen=True)
class ToyProblem:
    id: str  # content-derived, e.g. "L2:7+5-3": the same problem has the same id in every set
    problem: str  # "Compute 7 + 5 - 3."
    start: int
    steps: tuple[tuple[str, int], ...]  # (op, operand) with op in "+-", applied left to right
    answer: str  # the final value, e.g. "9"
    level: int  # number of operations


def running_values(problem: ToyProblem) -> list[int]:
    """The start value followed by the value after each step."""
    values = [problem.start]
    for op, operand in problem.steps:
        values.append(values[-1] + operand if op == "+" else values[-1] - operand)
    return values


def _build(start: int, steps: Sequence[tuple[str, int]]) -> ToyProblem:
    value = start
    for op, b in steps:
        value = value + b if op == "+" else value - b
    chain = f"{start}" + "".join(f"{op}{b}" for op, b in steps)
    text = f"Compute {start}" + "".join(f" {op} {b}" for op, b in steps) + "."
    return ToyProblem(f"L{len(steps)}:{chain}", text, start, tuple(steps), str(value), len(steps))


def _moves(value: int) -> list[tuple[str, int, int]]:
    """(op, operand, next value) for every step allowed from `value`."""
    moves = [("+", b, value + b) for b in DIGITS if value + b <= MAX_VALUE]
    return moves + [("-", b, value - b) for b in DIGITS if value - b >= 0]


@lru_cache(maxsize=None)
def _count(value: int, steps_left: int) -> int:
    """Number of distinct step sequences of length `steps_left` from `value`."""
    if steps_left == 0:
        return 1
    return sum(_count(nxt, steps_left - 1) for _, _, nxt in _moves(value))


def level_capacity(level: int) -> int:
    """Number of distinct problems at a level (126, 1899, 30_036, 487_674, 8_059_458 for 1..5)."""
    return sum(_count(start, level) for start in DIGITS)


def _pick(rng: random.Random, options: Sequence[tuple[Any, int]]) -> Any:
    """An option drawn with probability proportional to its integer weight."""
    r = rng.randrange(sum(weight for _, weight in options))
    for option, weight in options:
        if r < weight:
            return option
        r -= weight
    raise AssertionError("unreachable")


def make_problem(rng: random.Random, level: int) -> ToyProblem:
    """One problem drawn uniformly from the distinct problems with `level` operations."""
    if level < 1:
        raise ValueError(f"level must be at least 1, got {level}")
    value = start = _pick(rng, [(start, _count(start, level)) for start in DIGITS])
    steps: list[tuple[str, int]] = []
    for left in range(level, 0, -1):
        op, operand, value = _pick(rng, [((op, b, nxt), _count(nxt, left - 1)) for op, b, nxt in _moves(value)])
        steps.append((op, operand))
    return _build(start, steps)


def concise_solution(problem: ToyProblem) -> str:
    """The bare chain: "7+5=12. 12-3=9.\\nAnswer: 9"."""
    values = running_values(problem)
    chain = " ".join(f"{a}{op}{b}={c}." for a, (op, b), c in zip(values, problem.steps, values[1:]))
    return f"{chain}\nAnswer: {problem.answer}"


def verbose_solution(problem: ToyProblem, rng: random.Random, p_detour: float = 0.25, p_fix: float = 0.1) -> str:
    """The thinking style: plan, each step with its inverse check, random detours and self-corrections."""
    moves = [f"{op}{b}" for op, b in problem.steps]
    plan = moves[0] if len(moves) == 1 else ", ".join(moves[:-1]) + ", then " + moves[-1]
    lines = [f"We start at {problem.start} and apply {plan}."]
    values = running_values(problem)
    for i, (a, (op, b), c) in enumerate(zip(values, problem.steps, values[1:]), start=1):
        inverse = "-" if op == "+" else "+"
        step = f"Step {i}: {a}{op}{b}="
        if rng.random() < p_fix:
            off = rng.choice((1, 2))
            wrong = c + off if c - off < 0 or rng.random() < 0.5 else c - off
            step += f"{wrong}. Wait, that is wrong. {a}{op}{b}="
        lines.append(f"{step}{c}. Check: {c}{inverse}{b}={a}, ok.")
        if rng.random() < p_detour:
            lines.append(f"Wait, let me recompute: {a}{op}{b}={c}.")
    lines += [f"So the result is {problem.answer}.", f"Answer: {problem.answer}"]
    return "\n".join(lines)


def _available(levels: Sequence[int], excluded: set[str]) -> dict[int, int]:
    """Distinct problems per level outside `excluded` (a text's level is its number of operators)."""
    return {lv: level_capacity(lv) - sum(t.count(" + ") + t.count(" - ") == lv for t in excluded) for lv in levels}


def _quotas(n: int, available: dict[int, int]) -> dict[int, int]:
    """Equal shares per level; a level short of its share gives all it has and the others make up the rest."""
    if n > sum(available.values()):
        raise ValueError(f"asked for {n} distinct problems but the levels hold only {sum(available.values())}")
    quotas: dict[int, int] = {}
    left = n
    order = sorted(available, key=lambda level: (available[level], level))
    for i, level in enumerate(order):
        quotas[level] = min(available[level], -(-left // (len(order) - i)))  # ceil: shares differ by <= 1
        left -= quotas[level]
    return quotas


def problems(
    n: int, seed: int, levels: Sequence[int] = LEVELS, exclude: Collection[str] = frozenset()
) -> list[ToyProblem]:
    """`n` problems with distinct texts, none in `exclude`, in shuffled order; deterministic in `seed`.

    Levels get equal shares (differing by at most one); a level with fewer distinct problems left than
    its share (level 1 has 126, level 2 has 1899) gives all it has and the other levels make up the rest.
    """
    rng = random.Random(seed)
    excluded = set(exclude)
    chosen: list[ToyProblem] = []
    for level, quota in sorted(_quotas(n, _available(levels, excluded)).items()):
        seen: set[str] = set()
        while len(seen) < quota:
            problem = make_problem(rng, level)
            if problem.problem not in seen and problem.problem not in excluded:
                seen.add(problem.problem)
                chosen.append(problem)
    rng.shuffle(chosen)
    return chosen


def held_out(per_level: int = HELD_OUT_PER_LEVEL) -> list[ToyProblem]:
    """The fixed evaluation set: `per_level` problems at each level, drawn with HELD_OUT_SEED."""
    return problems(per_level * len(LEVELS), HELD_OUT_SEED)


def held_out_texts(per_level: int = HELD_OUT_PER_LEVEL) -> frozenset[str]:
    """Problem texts of the held-out set: pass as `exclude` when building training or RLVR sets."""
    return frozenset(p.problem for p in held_out(per_level))


def to_problem(problem: ToyProblem) -> Problem:
    """The `opsd.core.data.Problem` the trainer sees. The reference solution is the concise chain, so a
    `reference` teacher demonstrates brevity as well as the answer (the verbose one would teach length)."""
    return Problem(problem.id, problem.problem, problem.answer, concise_solution(problem), {"level": problem.level})


def problem_rows(items: Sequence[ToyProblem]) -> list[dict[str, Any]]:
    """Rows in the shared schema (id, problem, solution, answer, level) that `opsd.core.data.load_problems` reads."""
    return [
        {"id": p.id, "problem": p.problem, "solution": concise_solution(p), "answer": p.answer, "level": p.level}
        for p in items
    ]


def sft_rows(
    n: int,
    seed: int,
    concise_fraction: float = 0.5,
    instruction: str = CONCISE_INSTRUCTION,
    exclude: Collection[str] = frozenset(),
    levels: Sequence[int] = LEVELS,
    p_detour: float = 0.25,
    p_fix: float = 0.1,
) -> list[dict[str, Any]]:
    """SFT rows {"id", "problem", "response", "level"}: `problem` is the user message.

    A round(n * concise_fraction) share of rows carries the conciseness instruction, built exactly as the
    `concise` teacher context builds it, and a concise response; the others are bare problems with
    verbose responses. Problems are drawn with replacement (levels balanced, none in `exclude`): a row
    is a (problem, rendering) pair and level 1 has only 126 distinct problems, fewer than any SFT set.
    """
    rng = random.Random(seed)
    excluded = set(exclude)
    if empty := [lv for lv, count in _available(levels, excluded).items() if count <= 0]:
        raise ValueError(f"levels {empty} have no problems outside the excluded set")
    concise_rows = set(rng.sample(range(n), round(n * concise_fraction)))
    rows = []
    for i in range(n):
        problem = make_problem(rng, levels[i % len(levels)])
        while problem.problem in excluded:
            problem = make_problem(rng, problem.level)
        if i in concise_rows:
            user = teacher_user_message(to_problem(problem), "concise", "", instruction)
            response = concise_solution(problem)
        else:
            user, response = problem.problem, verbose_solution(problem, rng, p_detour, p_fix)
        rows.append({"id": f"sft{i:06d}", "problem": user, "response": response, "level": problem.level})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line; written to a temporary file and renamed, so no half-written file remains."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)
    return path
