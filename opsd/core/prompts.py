"""Student prompts and teacher contexts (METHODS.md §1–§3), rendered with the model's chat template.

The student sees the problem alone. The teacher is the same network seeing privileged context in its
user turn; the student's response tokens then follow the teacher's prompt unchanged (see
`opsd.generation.rollouts.pack`). The wordings below are ours; `template` lets a user supply their own.
"""

from __future__ import annotations

import string
from typing import Literal

from transformers import PreTrainedTokenizerBase

from opsd.core.data import Problem
from opsd.core.errors import UserError

TeacherContext = Literal["reference", "answer", "concise", "template", "memo", "purified"]
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


def teacher_user_message(
    problem: Problem, context: TeacherContext, template: str, concise_instruction: str
) -> str:
    """The teacher's user turn for one problem (`purified`: its πT view, the same as `reference`;
    `memo` needs the memo and is built by opsd.teacher.memo.memo_teacher_message)."""
    if context in ("reference", "purified"):
        if not problem.solution:
            raise UserError(f"problem '{problem.id}' has no reference solution, which teacher.context=reference needs")
        return fill(REFERENCE_TEMPLATE, problem)
    if context == "answer":
        return fill(ANSWER_TEMPLATE, problem)
    if context == "concise":
        return f"{concise_instruction}\n\n{problem.problem}"
    if context == "template":
        return fill(template, problem)
    if context == "memo":
        return problem.problem  # placeholder: replaced per rollout once the memo is written
    raise ValueError(f"unknown teacher context {context!r}")


def reference_only_message(problem: Problem) -> str:
    return fill(REFERENCE_ONLY_TEMPLATE, problem)


def render_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str) -> list[int]:
    """Token ids of a one-turn chat ending where the assistant starts answering."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]
