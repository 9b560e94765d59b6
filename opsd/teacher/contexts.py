"""What the teacher is shown (METHODS.md §1–§4): one entry per `teacher.context`, in `CONTEXTS`.

The student sees the problem alone. The teacher is the same network (or another checkpoint) seeing
privileged context in its user turn; the student's response tokens then follow the teacher's prompt
unchanged. Each context knows what it needs from a problem row (a reference solution, the gold
answer), whether a memo is written per rollout (Kim & Lee) or Purified OPSD's three views are used,
the options it checks up front, and how it words the teacher's user turn. Adding a context is adding
its entry to `CONTEXTS`. The wordings are ours; `template` lets a user supply their own.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from opsd.core.data import Problem
from opsd.core.errors import UserError

TEMPLATE_FIELDS = ("problem", "solution", "answer")
REFERENCE_TEMPLATE = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n\n"
    "Having understood the reference solution, solve the problem in your own words."
)
REFERENCE_ONLY_TEMPLATE = (  # Purified OPSD's πR view: the reference without the problem
    "Here is a reference solution to a problem:\n{solution}\n\nSolve the problem in your own words."
)
ANSWER_TEMPLATE = "{problem}\n\nThe correct final answer is {answer}. Solve the problem and reach this answer."
CONCISE_INSTRUCTION = (
    "Solve the following problem concisely: think only as much as needed, skip restating and "
    "re-checking what is already clear, and give the final answer."
)


@dataclass(frozen=True)
class Wording:
    """The user's own words a context may use (the teacher section's `template` and `concise_instruction`)."""

    template: str = ""
    concise_instruction: str = CONCISE_INSTRUCTION


@dataclass(frozen=True)
class Context:
    """One teacher context: its name (`teacher.context`), the teacher's user turn for a problem, and
    what the run must know of it."""

    name: str
    message: Callable[[Problem, Wording], str]  # the teacher's user turn for one problem
    needs_answer: bool = False  # the gold answer goes into the teacher's prompt or the memo's feedback
    writes_memo: bool = False  # a memo per kept rollout is written and put into that rollout's teacher prompt
    purified: bool = False  # three frozen views (problem + reference, reference only, problem only) combined
    check: Callable[[Wording], None] = lambda wording: None  # refuse its options before any work starts


def check_template(template: str, option: str) -> None:
    """Only plain named fields from TEMPLATE_FIELDS: no attribute or index access, no positional fields."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(f"option {option} is not a valid template ({err})") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            raise UserError(
                f"option {option} may only use the fields {{problem}}, {{solution}}, {{answer}}; found {{{name}}}"
            )


def fill(template: str, problem: Problem) -> str:
    """Fill named fields by plain substitution (never `str.format` on user text)."""
    values = {"problem": problem.problem, "solution": problem.solution or "", "answer": problem.answer or ""}
    pieces = []
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if name is not None:
            pieces.append(values[name])
    return "".join(pieces)


def _with_reference(problem: Problem, wording: Wording) -> str:
    if not problem.solution:
        raise UserError(f"problem '{problem.id}' has no reference solution, which teacher.context=reference needs")
    return fill(REFERENCE_TEMPLATE, problem)


CONTEXTS = {c.name: c for c in (
    Context("reference", _with_reference),  # OPSD (Zhao et al.)
    Context("answer", lambda problem, wording: fill(ANSWER_TEMPLATE, problem), needs_answer=True),
    Context("concise", lambda problem, wording: f"{wording.concise_instruction}\n\n{problem.problem}"),  # OPSDC
    Context("template", lambda problem, wording: fill(wording.template, problem),
            check=lambda wording: check_template(wording.template, "teacher.template")),
    # Kim & Lee's memo: the problem alone here, replaced per rollout once its memo is written (teacher/memo.py)
    Context("memo", lambda problem, wording: problem.problem, needs_answer=True, writes_memo=True),
    Context("purified", _with_reference, purified=True),  # Shen et al.: its πT view is the reference context's
)}
TeacherContext = Literal[tuple(CONTEXTS)]  # type: ignore[valid-type]


def teacher_user_message(problem: Problem, context: str, template: str = "",
                         concise_instruction: str = CONCISE_INSTRUCTION) -> str:
    """The teacher's user turn for one problem under `context`."""
    return CONTEXTS[context].message(problem, Wording(template, concise_instruction))


def reference_only_message(problem: Problem) -> str:
    return fill(REFERENCE_ONLY_TEMPLATE, problem)
