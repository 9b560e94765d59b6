"""samples.jsonl: a few rollouts of every step, saved so that a run can be looked at, not only its means.

`opsd distill` and `opsd rlvr` write, for `samples_per_step` rollouts of each step (spread evenly
over the step's rollouts, in problem order), one JSON line each: the step, the problem id, the
prompt and response as text, the extracted and the gold answer, the grade, and what the stage did
with it (distill: kept by the gate, the teacher's prompt as rendered, the memo, the per-sequence
divergence; rlvr: reward, advantage, kept by the group filter). Under torchrun each process picks
its share of them from its own rollouts (`samples_per_step` / processes, rounded up) and rank 0 writes
them all, each row naming its `process`. A resumed run cuts the file back to the step of the
checkpoint it continues from, so it ends equal to the file of a run that never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from opsd.runtime import distributed
from opsd.runtime.runs import trim_rows

SAMPLES = "samples.jsonl"


class SamplesLog:
    """Appends a step's sample rows to samples.jsonl (rank 0; `run_dir` None elsewhere), after cutting
    the file back to `resumed_step`. `per_step` is this process's share of the rows per step."""

    def __init__(self, run_dir: Path | None, per_step: int, resumed_step: int, processes: int = 1):
        self.per_step = math.ceil(per_step / processes)
        self.file = None
        if run_dir is not None and per_step > 0:
            trim_rows(run_dir / SAMPLES, resumed_step)
            self.file = (run_dir / SAMPLES).open("a", encoding="utf-8")

    def write(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Every process calls it with its rows (a collective under torchrun); rank 0 writes them all."""
        shares = distributed.gather_long(rows) if self.per_step > 0 else [rows]
        if self.file is None:
            return
        many = len(shares) > 1
        self.file.writelines(json.dumps({"step": step, **({"process": rank} if many else {}),
                                         **{k: _plain(v) for k, v in row.items()}}) + "\n"
                             for rank, share in enumerate(shares) for row in share)
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
