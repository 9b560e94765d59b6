"""Problems from JSONL or Parquet: `problem`, `answer`, optional `solution` and `id`; extra fields kept.

Rows graded by running code (`verifier: code`, HumanEval) carry `tests` instead of an answer, so
they never need one.

Field names are remappable (e.g. `question` → problem) so files from other projects load as they are.
Every defect is a `UserError` naming the file and line.
"""

from __future__ import annotations

import collections
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsd.core.errors import UserError


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str | None
    solution: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fields:
    problem: str = "problem"  # column holding the problem text
    answer: str = "answer"  # column holding the gold final answer
    solution: str = "solution"  # column holding the reference solution (optional)
    id: str = "id"  # column holding a stable id (optional; the row number otherwise)


def load_problems(path: str | Path, fields: Fields = Fields(), require_answer: bool = True,
                  default_verifier: str = "math", answer_free: frozenset[str] = frozenset()) -> list[Problem]:
    """Read every row of a .jsonl/.json or .parquet file into `Problem`s. With `require_answer`,
    a row without an answer is refused unless its verifier (its `verifier` field, else
    `default_verifier`) is one of `answer_free`, which grade without one (opsd.verifiers.ANSWER_FREE)."""
    rows = read_rows(path)
    problems = [_to_problem(row, where, fields, require_answer and (row.get("verifier") or default_verifier)
                            not in answer_free) for where, row in rows]
    counts = collections.Counter(problem.id for problem in problems)
    repeated = [id_ for id_, count in counts.items() if count > 1]
    if repeated:  # harmless for training; said once, since it often means a file was concatenated twice
        print(f"opsd: warning: data file {path} has {len(repeated)} id(s) more than once (first: '{repeated[0]}'); "
              "all rows are used", file=sys.stderr)
    return problems


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a JSONL or Parquet file; `where` names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)
    if not rows:
        raise UserError(f"data file {path} holds no rows")
    return rows


def load_pairs(path: str | Path, problem_field: str = "problem", response_field: str = "response") -> list[tuple[str,
                                                                                                                 str]]:
    """(problem, response) pairs for supervised fine-tuning."""
    pairs = []
    for where, row in read_rows(path):
        for name in (problem_field, response_field):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise UserError(f"{where} has no '{name}' text")
        pairs.append((row[problem_field], row[response_field]))
    return pairs


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} is not a JSON object")
            rows.append((f"{path} line {number}", row))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path} is not a readable Parquet file ({err})") from None
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _to_problem(row: dict[str, Any], where: str, fields: Fields, require_answer: bool) -> Problem:
    problem = row.get(fields.problem)
    if not isinstance(problem, str) or not problem.strip():
        raise UserError(f"{where} has no '{fields.problem}' text")
    answer = row.get(fields.answer)
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    if require_answer and (answer is None or not answer.strip()):
        raise UserError(f"{where} has no '{fields.answer}' (the gold final answer)")
    solution = row.get(fields.solution)
    if solution is not None and not isinstance(solution, str):
        raise UserError(f"{where} has a '{fields.solution}' that is not text")
    row_id = row.get(fields.id)
    known = {fields.problem, fields.answer, fields.solution, fields.id}
    extra = {k: v for k, v in row.items() if k not in known}
    return Problem(
        id=str(row_id) if row_id is not None else where.rsplit(" ", 1)[-1],
        problem=problem,
        answer=answer,
        solution=solution,
        extra=extra,
    )
