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


# --- what each metric means ----------------------------------------------------------------------
# The one place a metric of metrics.jsonl is described: the docs' metrics reference is generated from this table
# (docs/hooks.py), and tests/test_docs.py checks it against the names the stages log on a tiny run.
# name: (the commands that log it, what it is)
METRICS: dict[str, tuple[str, str]] = {
    "step": ("sft, rlvr, distill", "the optimizer step this line describes (1, 2, ...)"),
    "loss/divergence": ("distill", "the teacher–student divergence, a token mean over the distilled (kept) tokens of "
                                   "every process"),
    "loss/clipped_ratio": ("distill", "share of distilled positions where the pointwise clip τ capped at least one "
                                      "vocabulary term"),
    "loss/student_entropy": ("distill", "the student's entropy at the loss temperature, a token mean over the "
                                        "distilled tokens"),
    "loss/nll": ("sft", "negative log-likelihood of the response tokens, a token mean"),
    "purified/gap_cosine": ("distill (teacher.context=purified)", "cosine between the total gap log πT − log P0 and "
                                                                  "the reference-induced gap log πR − log P0, both "
                                                                  "centred; a token mean"),
    "purified/gap_norm_ratio": ("distill (teacher.context=purified)", "norm of the reference-induced gap over the norm "
                                                                      "of the total gap; a token mean"),
    "reward/mean": ("rlvr", "mean reward of the step's rollouts, overlong penalty included"),
    "rollout/accuracy": ("rlvr, distill", "share of the step's rollouts graded correct (null when a row's verifier "
                                          "cannot grade, e.g. code without the opt-in)"),
    "rollout/count": ("rlvr, distill", "rollouts sampled in the step, all processes"),
    "rollout/kept": ("rlvr, distill", "rollouts trained on: kept by distill's gate or by rlvr's group filter"),
    "rollout/kept_groups": ("rlvr", "problems whose group of samples had unequal rewards (the others are dropped)"),
    "rollout/restated": ("rlvr, distill", "answers refused by the math verifier for restating an expression of the "
                                          "problem"),
    "rollout/response_tokens_mean": ("rlvr, distill", "mean response length in tokens over the step's rollouts"),
    "rollout/response_tokens_max": ("rlvr, distill", "the longest response of the step, in tokens"),
    "rollout/truncated_ratio": ("rlvr, distill", "share of rollouts that reached sampling.max_new_tokens"),
    "rollout/logprob_gap": ("rlvr, distill", "mean |log p_engine(y) − log p_trainer(y)| over the sampled tokens "
                                             "trained on (null when greedy or nothing was kept)"),
    "rollout/logprob_gap_outside": ("rlvr, distill", "share of those tokens that the trainer's top-k/top-p would not "
                                                     "have allowed"),
    "policy/clipped_ratio": ("rlvr", "share of tokens where the clipped term of the PPO objective was the active one"),
    "policy/ratio_mean": ("rlvr", "mean importance ratio π/π_old over the trained tokens"),
    "policy/kl": ("rlvr", "k3 estimate of KL(π‖π_ref) per token (null without a KL term)"),
    "teacher/updated": ("distill", "whether the teacher's weights changed after this step (refresh, ema, live)"),
    "optim/grad_norm": ("sft, rlvr, distill", "gradient norm before clipping"),
    "optim/lr": ("sft, rlvr, distill", "the learning rate of this step"),
    "optim/skipped_steps": ("sft, rlvr, distill", "steps skipped so far for a non-finite loss or gradient norm "
                                                  "(optim.max_skipped_in_a_row in a row stop the run)"),
    "optim/empty_step": ("rlvr, distill", "true when the gate or the group filter kept nothing to train on "
                                          "(run.max_empty_steps_in_a_row in a row stop the run)"),
    "train/tokens": ("rlvr, distill", "response tokens trained on, all processes"),
    "data/cut_sequences": ("sft", "pairs of the data set longer than data.max_length, cut to it (counted once when the "
                                   "data is read)"),
    "time/generate_s": ("rlvr, distill", "seconds sampling the rollouts (the slowest process)"),
    "time/grade_s": ("rlvr, distill", "seconds grading them"),
    "time/memo_s": ("distill", "seconds writing the memos (teacher.context=memo; 0 otherwise)"),
    "time/teacher_s": ("distill", "seconds in the teacher's forwards"),
    "time/student_s": ("distill", "seconds in the student's forward, the divergence and the backward"),
    "time/old_logprobs_s": ("rlvr", "seconds computing the sampling policy's log-probabilities (and the KL "
                                    "reference's)"),
    "time/train_s": ("rlvr", "seconds in the policy's forward and backward"),
    "time/step_s": ("sft, rlvr, distill", "seconds of the whole step"),
    "throughput/generate_tokens_per_s": ("rlvr, distill", "response tokens sampled per second of generation"),
    "throughput/train_tokens_per_s": ("distill", "distilled tokens per second of teacher and student compute"),
    "throughput/tokens_per_s": ("sft", "tokens trained on per second"),
}
