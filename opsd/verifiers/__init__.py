"""Verifiers: one signature, (response, problem) → verdict, chosen per problem.

A problem row may name its verifier (`verifier` field, as the benchmark files of ../shared/data do);
rows without one use `verifier.default`. Every verifier is one entry of `VERIFIERS` (its name, what
its rows need, its row checks and its grading), the only place that dispatches on that name. A verdict says whether
the response is correct, the reward it earns (what `opsd rlvr` optimises and `opsd distill`'s gating reads) and the
answer that was extracted, for inspection.

Verifiers:
  math         extraction: opsd/verifiers/answer.py; matching: opsd/verifiers/math.py; math-verify in a
               killable worker process: opsd/verifiers/worker.py.
  exact_match  the final answer of a chain of thought against the target, normalised (BBH):
               opsd/verifiers/exact_match.py.
  code         the response's code run in a sandboxed process, the row's `tests` in another that calls
               it (HumanEval): extraction and programs in opsd/verifiers/code.py; the sandbox in
               opsd/verifiers/sandbox/. Needs `verifier.allow_code_execution=true`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from opsd.core.data import Problem
from opsd.core.errors import UserError, require
from opsd.verifiers import code, exact_match
from opsd.verifiers.answer import extract_answer
from opsd.verifiers.sandbox import Limits, describe, isolation, run_tests
from opsd.verifiers.worker import Grader


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reward: float  # 1.0 when correct, else 0.0
    extracted: str | None  # the final answer (code: the code) found in the response (None: none found)
    restated: bool = False  # refused for restating an expression of the problem (math; docs/verifiers.md)


@dataclass(frozen=True)
class Verifier:
    """One verifier: its name (a row's `verifier` field), what its rows need, and its grading."""

    name: str
    needs_answer: bool  # rows carry a gold answer (code rows carry tests instead)
    check_row: Callable[[Problem, str, VerifierConfig, str], None]  # refuse a row before any work starts
    grade: Callable[[Verifiers, list[str], list[Problem]], list[Verdict]]  # a batch of (response, problem)


def _no_row_check(problem: Problem, path: str, config: VerifierConfig, option: str) -> None:
    pass


def _check_code_row(problem: Problem, path: str, config: VerifierConfig, option: str) -> None:
    if not config.allow_code_execution:
        raise UserError(f"data file {path}: problem '{problem.id}' is graded by running model-written code; set "
                        f"{option}.allow_code_execution=true to run it in opsd's sandbox (docs/sandbox.md)")
    for field in ("tests", "entry_point"):
        if not isinstance(problem.extra.get(field), str) or not problem.extra[field].strip():
            raise UserError(f"data file {path}: problem '{problem.id}' (verifier code) has no '{field}' text")


def _grade_math(verifiers: Verifiers, responses: list[str], problems: list[Problem]) -> list[Verdict]:
    verdicts = []
    for response, problem in zip(responses, problems):
        if not problem.answer:
            verdicts.append(Verdict(False, 0.0, extract_answer(response)))
            continue
        before = verifiers.math.restated
        correct = verifiers.math.grade_one(response, problem.answer, problem.problem)
        verdicts.append(Verdict(correct, float(correct), extract_answer(response),
                                restated=verifiers.math.restated > before))
    return verdicts


def _grade_exact_match(verifiers: Verifiers, responses: list[str], problems: list[Problem]) -> list[Verdict]:
    verdicts = []
    for response, problem in zip(responses, problems):
        extracted = exact_match.extract_final_answer(response)
        correct = problem.answer is not None and exact_match.answers_match(extracted, problem.answer, problem.problem)
        verdicts.append(Verdict(correct, float(correct), extracted))
    return verdicts


def _grade_code(verifiers: Verifiers, responses: list[str], problems: list[Problem]) -> list[Verdict]:
    """The programs run `code_workers` at a time, each in the sandbox (program and tests apart)."""
    verifiers.check_sandbox()
    codes = [code.extract_code(r, p.extra["entry_point"]) for r, p in zip(responses, problems)]
    jobs = [(code.program_for(p.problem, c, p.extra["entry_point"]), code.checks_for(p.problem, p.extra["tests"]),
             p.extra["entry_point"]) for c, p in zip(codes, problems)]
    with ThreadPoolExecutor(max_workers=verifiers.config.code_workers) as pool:
        outcomes = list(pool.map(lambda job: run_tests(*job, verifiers.limits), jobs))
    verifiers.code_timeouts += sum(o.status == "timeout" for o in outcomes)
    verifiers.sandbox_errors += sum(o.status == "error" for o in outcomes)
    verifiers.code_unsupported += sum(o.kind == "unsupported" for o in outcomes)
    return [Verdict(o.passed, float(o.passed), c or None) for o, c in zip(outcomes, codes)]


# every verifier opsd has: adding one is adding its entry here (and its options to VerifierConfig)
VERIFIERS = {v.name: v for v in (
    Verifier("math", needs_answer=True, check_row=_no_row_check, grade=_grade_math),
    Verifier("exact_match", needs_answer=True, check_row=_no_row_check, grade=_grade_exact_match),
    Verifier("code", needs_answer=False, check_row=_check_code_row, grade=_grade_code),
)}
VerifierName = Literal[tuple(VERIFIERS)]  # type: ignore[valid-type]
ANSWER_FREE = frozenset(name for name, v in VERIFIERS.items() if not v.needs_answer)  # for data.load_problems


@dataclass(frozen=True)
class VerifierConfig:
    default: VerifierName = "math"  # the verifier of problems whose row names none (`verifier` field)
    timeout_s: float = 5.0  # per-answer limit of the math worker process
    allow_code_execution: bool = False  # run model-written code (verifier: code rows) in the sandbox (docs/sandbox.md)
    code_timeout_s: float = 10.0  # wall-clock limit of one program (prompt + code + tests)
    code_memory_mb: int = 1024  # memory limit of a program: as a whole (cgroup, as root) and per process
    code_workers: int = 2  # programs run at once


def check_verifier(config: VerifierConfig) -> None:
    require(("verifier.timeout_s", config.timeout_s > 0, "positive"),
            ("verifier.code_timeout_s", config.code_timeout_s > 0, "positive"),
            ("verifier.code_memory_mb", config.code_memory_mb >= 64, "at least 64"),
            ("verifier.code_workers", config.code_workers >= 1, "at least 1"))


def verifier_of(problem: Problem, default: str) -> str:
    return problem.extra.get("verifier") or default


def gradable(problem: Problem, default: str) -> bool:
    """Whether a verdict on `problem` means something: it has a gold answer or needs none (code)."""
    return bool(problem.answer) or verifier_of(problem, default) in ANSWER_FREE


def check_problems(problems: list[Problem], path: str, verifier: VerifierConfig, option: str = "verifier") -> None:
    """Refuse, before any work starts, a data file whose rows name a verifier opsd does not have or
    fail their verifier's own row checks (code: the opt-in, the tests); `option` names the config
    section in the message."""
    for problem in problems:
        name = verifier_of(problem, verifier.default)
        if name not in VERIFIERS:
            raise UserError(f"data file {path}: problem '{problem.id}' asks for verifier '{name}', which opsd does not "
                            f"have (known: {', '.join(VERIFIERS)})")
        VERIFIERS[name].check_row(problem, path, verifier, option)


class Verifiers:
    """Grades responses, each by its problem's verifier. A context manager: it owns worker processes."""

    def __init__(self, config: VerifierConfig = VerifierConfig()):
        self.config = config
        self.default = config.default
        self.math = Grader(timeout_s=config.timeout_s)
        self.limits = Limits(timeout_s=config.code_timeout_s, memory_mb=config.code_memory_mb)
        self.code_timeouts = 0  # programs stopped at verifier.code_timeout_s
        self.sandbox_errors = 0  # programs the sandbox itself failed to run
        self.code_unsupported = 0  # programs failed because a value could not cross as plain data
        self._sandbox_checked = False

    def verify(self, responses: list[str], problems: list[Problem]) -> list[Verdict]:
        """The verdict of each response on its problem, grouped by verifier (each group in one batch)."""
        if len(responses) != len(problems):
            raise ValueError(f"{len(responses)} responses but {len(problems)} problems")
        groups: dict[str, list[int]] = {}
        for index, problem in enumerate(problems):
            groups.setdefault(verifier_of(problem, self.default), []).append(index)
        verdicts: list[Verdict | None] = [None] * len(responses)
        for name, indices in groups.items():
            if name not in VERIFIERS:
                raise ValueError(f"unknown verifier {name!r}")
            graded = VERIFIERS[name].grade(self, [responses[i] for i in indices], [problems[i] for i in indices])
            for index, verdict in zip(indices, graded):
                verdicts[index] = verdict
        return [v for v in verdicts if v is not None]

    def check_sandbox(self) -> None:
        """Before the first program: refuse without the opt-in, say once what confines programs here."""
        if self._sandbox_checked:
            return
        if not self.config.allow_code_execution:
            raise UserError("grading code rows runs model-written code; set verifier.allow_code_execution=true")
        layers = isolation()
        if not layers.get("works"):
            raise UserError(describe(layers))
        print(f"opsd: code sandbox: {describe(layers)}", file=sys.stderr)
        self._sandbox_checked = True

    def counters(self) -> dict[str, int]:
        """Events so far: math answers that timed out, math worker crashes, restatements refused,
        programs stopped at their time limit, programs the sandbox failed to run, programs whose
        values could not cross between program and tests as plain data."""
        return {"timeouts": self.math.timeouts, "crashes": self.math.crashes, "restated": self.math.restated,
                "code_timeouts": self.code_timeouts, "sandbox_errors": self.sandbox_errors,
                "code_unsupported": self.code_unsupported}

    def close(self) -> None:
        self.math.close()

    def __enter__(self) -> Verifiers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
