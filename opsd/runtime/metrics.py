"""Per-step metrics: one JSON line per step in the run folder, the trackers of `run.report_to`
(opsd/runtime/tracking.py), a progress bar named by its stage ("distill", "rlvr", "sft", or the stage's name in
a pipeline)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from opsd.runtime.tracking import open_trackers, scalars


def progress_bar(name: str, total: int, unit: str, done: int = 0, disable: bool = False) -> tqdm:
    """A bar on stderr named `name` counting `unit`s; redrawn at every update, so its postfix is the
    latest step's (opsd's updates are seconds apart)."""
    return tqdm(total=total, initial=done, disable=disable, dynamic_ncols=True, desc=name, unit=unit, mininterval=0,
                file=sys.stderr)


class MetricsLog:
    def __init__(self, run_dir: Path | None, total_steps: int, report_to: tuple[str, ...] = ("tensorboard",),
                 done: int = 0, name: str = "opsd", config: dict[str, Any] | None = None):
        """`run_dir` None (ranks other than 0): nothing is written or shown."""
        self.trackers = open_trackers(report_to, run_dir, config) if run_dir else []
        self.file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8") if run_dir else None
        self.bar = progress_bar(name, total_steps, "step", done, disable=run_dir is None)

    def write(self, step: int, metrics: dict[str, Any], postfix: dict[str, float] | None = None) -> None:
        """Append one step's metrics; `postfix` is what the progress bar shows."""
        if self.file is not None:
            row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.trackers:
            values = scalars(metrics)
            for tracker in self.trackers:
                tracker.log(values, step)
        # the postfix first: update() draws the bar, with this step's numbers
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in (postfix or {}).items()}, refresh=False)
        self.bar.update(1)

    def say(self, message: str) -> None:
        """A line on the terminal above the progress bar (rank 0 only)."""
        if self.file is not None:
            self.bar.write(message, file=sys.stderr)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        # also when a stop is raised: the bar ends its line before the error is printed
        self.close(failed=kind is not None)

    def close(self, failed: bool = False) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        for tracker in self.trackers:
            tracker.close(failed)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value

