"""Which rollouts are distilled, decided from grading alone, before any teacher compute (Kim & Lee)."""

from __future__ import annotations

from typing import Literal

Gating = Literal["all", "correct_only", "incorrect_only", "correct_and_truncated"]


def gate(correct: list[bool], truncated: list[bool], mode: Gating) -> list[bool]:
    """Keep-flags per rollout. `correct_and_truncated` keeps correct rollouts and truncated ones
    (which never reached an answer, so they are not known to be wrong)."""
    if mode == "all":
        return [True] * len(correct)
    if mode == "correct_only":
        return list(correct)
    if mode == "incorrect_only":
        return [not c for c in correct]
    if mode == "correct_and_truncated":
        return [c or t for c, t in zip(correct, truncated)]
    raise ValueError(f"unknown gating {mode!r}")
