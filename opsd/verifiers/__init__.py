"""Verifiers: one signature, (response, problem) → verdict, chosen per problem.

A problem row may name its verifier (`verifier` field, as the benchmark files of ../shared/data do);
rows without one use `verifier.default`. The dispatch on that name happens in `Verifiers.verify`
only. A verdict says whether the response is correct, the reward it earns (what `opsd rlvr`
optimises and `opsd distill`'s gating reads) and the answer that was extracted, for inspection.

Verifiers: `math` (extraction: opsd/verifiers/answer.py; matching: opsd/verifiers/math.py; math-verify
in a killable worker process: opsd/verifiers/worker.py). Exact-match and sandboxed code execution
come next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from opsd.data import Problem
from opsd.errors import UserError, require
from opsd.verifiers.answer import extract_answer
from opsd.verifiers.worker import Grader

VerifierName = Literal["math"]
KNOWN = get_args(VerifierName)


@dataclass(frozen=True)
class VerifierConfig:
    default: VerifierName = "math"  # the verifier of problems whose row names none (`verifier` field)
    timeout_s: float = 5.0  # per-answer limit of the math worker process


def check_verifier(config: VerifierConfig) -> None:
    require(("verifier.timeout_s", config.timeout_s > 0, "positive"))


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reward: float  # 1.0 when correct, else 0.0
    extracted: str | None  # the final answer found in the response (None: none found)
    restated: bool = False  # refused for restating an expression of the problem (math; README grader table)


def verifier_of(problem: Problem, default: VerifierName) -> str:
    return problem.extra.get("verifier") or default


def check_problems(problems: list[Problem], path: str, default: VerifierName) -> None:
    """Refuse a data file whose rows name a verifier opsd does not have, before any work starts."""
    for problem in problems:
        name = verifier_of(problem, default)
        if name not in KNOWN:
            raise UserError(f"data file {path}: problem '{problem.id}' asks for verifier '{name}', which opsd does not "
                            f"have (known: {', '.join(KNOWN)})")


class Verifiers:
    """Grades responses, each by its problem's verifier. A context manager: it owns worker processes."""

    def __init__(self, config: VerifierConfig = VerifierConfig()):
        self.default = config.default
        self.math = Grader(timeout_s=config.timeout_s)

    def verify(self, responses: list[str], problems: list[Problem]) -> list[Verdict]:
        if len(responses) != len(problems):
            raise ValueError(f"{len(responses)} responses but {len(problems)} problems")
        verdicts = []
        for response, problem in zip(responses, problems):
            name = verifier_of(problem, self.default)
            if name == "math":
                verdicts.append(self._math(response, problem))
            else:
                raise ValueError(f"unknown verifier {name!r}")
        return verdicts

    def _math(self, response: str, problem: Problem) -> Verdict:
        if not problem.answer:
            return Verdict(False, 0.0, extract_answer(response))
        before = self.math.restated
        correct = self.math.grade_one(response, problem.answer, problem.problem)
        return Verdict(correct, float(correct), extract_answer(response), restated=self.math.restated > before)

    def counters(self) -> dict[str, int]:
        """Events of the math verifier so far: answers that timed out, worker crashes, restatements refused."""
        return {"timeouts": self.math.timeouts, "crashes": self.math.crashes, "restated": self.math.restated}

    def close(self) -> None:
        self.math.close()

    def __enter__(self) -> Verifiers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
