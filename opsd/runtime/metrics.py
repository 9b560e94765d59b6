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


class Tally:
    """A step's metrics from each process's part of the step, reduced over the processes into what one
    process doing the whole step would log: means weighted by what they average over, counts summed,
    maxima and minima over all. In one process, the values as they are.

        tally = Tally()
        tally.mean("loss/divergence", divergence_sum, tokens)   # Σ divergence_sum / Σ tokens (NaN when 0)
        tally.sum("rollout/count", len(rollouts))
        tally.max("rollout/response_tokens_max", max(lengths))
        tally.rate("throughput/tokens_per_s", tokens, seconds)  # Σ tokens / the slowest process's seconds
        tally.same("optim/lr", lr)                               # already equal on every process
        metrics = tally.reduce()                                 # every process calls it (two all-reduces)
    """

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.values: dict[str, tuple[float, float]] = {}
        self.counts: set[str] = set()  # sums and extremes of whole numbers: logged as integers

    def mean(self, name: str, total: float, count: float) -> None:
        self._add(name, "mean", float(total) if count else 0.0, float(count))

    def sum(self, name: str, value: float) -> None:
        self._add(name, "sum", value, 0.0)

    def max(self, name: str, value: float) -> None:
        self._add(name, "max", value, 0.0)

    def min(self, name: str, value: float) -> None:
        self._add(name, "min", value, 0.0)

    def rate(self, name: str, amount: float, seconds: float) -> None:
        self._add(name, "rate", float(amount), float(seconds))

    def same(self, name: str, value: Any) -> None:
        self.kinds[name], self.values[name] = "same", (value, 0.0)

    def _add(self, name: str, kind: str, value: float, count: float) -> None:
        if kind in ("sum", "max", "min") and isinstance(value, int):  # bool too
            self.counts.add(name)
        self.kinds[name], self.values[name] = kind, (float(value), float(count))

    def reduce(self) -> dict[str, Any]:
        from opsd.runtime import distributed

        added = [n for n, k in self.kinds.items() if k in ("mean", "sum", "rate")]
        highest = [n for n, k in self.kinds.items() if k == "max"]
        lowest = [n for n, k in self.kinds.items() if k == "min"]
        timed = [n for n, k in self.kinds.items() if k == "rate"]
        sums = distributed.sum_floats([v for n in added for v in self.values[n]])
        maxima = distributed.max_floats([self.values[n][0] for n in highest] + [-self.values[n][0] for n in lowest]
                                        + [self.values[n][1] for n in timed])
        reduced = dict(zip(added, zip(sums[0::2], sums[1::2])))
        slowest = dict(zip(timed, maxima[len(highest) + len(lowest):]))
        result = {}
        for name, kind in self.kinds.items():
            if kind == "mean":
                total, count = reduced[name]
                result[name] = total / count if count else float("nan")
            elif kind == "rate":
                result[name] = reduced[name][0] / slowest[name] if slowest[name] > 0 else float("nan")
            elif kind == "sum":
                result[name] = reduced[name][0]
            elif kind == "max":
                result[name] = maxima[highest.index(name)]
            elif kind == "min":
                result[name] = -maxima[len(highest) + lowest.index(name)]
            else:
                result[name] = self.values[name][0]
            if name in self.counts and math.isfinite(result[name]):
                result[name] = int(result[name])
        return result


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

