"""samples.jsonl: a few rollouts of every step, saved so that a run can be looked at, not only its means.

`opsd distill` and `opsd rlvr` write, for `samples_per_step` rollouts of each step (spread evenly
over the step's rollouts, in problem order), one JSON line each: the step, the problem id, the
prompt and response as text, the extracted and the gold answer, the grade, and what the stage did
with it (distill: kept by the gate, the teacher's prompt as rendered, the memo, the per-sequence
divergence; rlvr: reward, advantage, kept by the group filter). Under torchrun only rank 0 writes,
its own rollouts (as for metrics.jsonl). A resumed run cuts the file back to the step of the
checkpoint it continues from, so it ends equal to the file of a run that never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from opsd.core.data import Problem
from opsd.generation.rollouts import Rollout
from opsd.runtime.runs import trim_rows
from opsd.verifiers import Verdict

SAMPLES = "samples.jsonl"


def pick(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(count) (all of them when count ≤ wanted)."""
    if count <= wanted:
        return list(range(count))
    return [i * count // wanted for i in range(wanted)]


def rollout_rows(tokenizer, rollouts: list[Rollout], problems: list[Problem], verdicts: list[Verdict],
                 picked: list[int]) -> list[dict[str, Any]]:
    """The fields every stage saves of the rollouts at `picked`: problem id, prompt as rendered (chat
    template included), response, extracted and gold answer, grade, truncation, length in tokens."""
    rows = []
    for index in picked:
        rollout, verdict = rollouts[index], verdicts[index]
        problem = problems[rollout.problem_index]
        rows.append({
            "id": problem.id,
            "prompt": render(tokenizer, rollout.prompt_ids),
            "response": tokenizer.decode(rollout.response_ids, skip_special_tokens=True),
            "extracted": verdict.extracted,
            "answer": problem.answer,
            "correct": verdict.correct,
            "truncated": rollout.truncated,
            "response_tokens": len(rollout.response_ids),
        })
    return rows


def render(tokenizer, ids: list[int]) -> str:
    """Token ids as the model sees them, special tokens of the chat template included."""
    return tokenizer.decode(ids, skip_special_tokens=False)


class SamplesLog:
    """Appends a step's sample rows to samples.jsonl. Inactive (writes nothing, `per_step` 0) on
    ranks other than 0 or when `per_step` is 0; when active, first cuts the file back to `resumed_step`."""

    def __init__(self, run_dir: Path | None, per_step: int, resumed_step: int):
        self.per_step = per_step if run_dir is not None else 0
        self.file = None
        if self.per_step > 0:
            trim_rows(run_dir / SAMPLES, resumed_step)
            self.file = (run_dir / SAMPLES).open("a", encoding="utf-8")

    def write(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self.file is None:
            return
        self.file.writelines(json.dumps({"step": step, **{k: _plain(v) for k, v in row.items()}}) + "\n"
                             for row in rows)
        self.file.flush()

    def __enter__(self) -> SamplesLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value
