"""The commands with a config: one module each, one loop each (sft, rlvr, distill), the evaluation, the
pipeline that chains them; `session.py` is what the training stages share around their loops.

`COMMANDS` is the one table of them, for the command line and the pipeline: each entry imports its
module only when asked (torch comes with it), and gives the command's config class, its run function
and the checks of its options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    config: type  # the command's config dataclass
    run: Callable[..., Any]  # run(config, name=...) -> its folder (None on ranks other than 0)
    check: Callable[..., None] | None  # check_options(config, world): a training stage's own checks


def _sft() -> Command:
    from opsd.stages import sft

    return Command(sft.SFTConfig, sft.run_sft, sft.check_options)


def _rlvr() -> Command:
    from opsd.stages import rlvr

    return Command(rlvr.RLVRConfig, rlvr.run_rlvr, rlvr.check_options)


def _distill() -> Command:
    from opsd.stages import distill

    return Command(distill.DistillConfig, distill.run_distill, distill.check_options)


def _eval() -> Command:
    from opsd.stages import eval as evaluation

    return Command(evaluation.EvalConfig, evaluation.run_eval, None)


def _pipeline() -> Command:
    from opsd.stages import pipeline

    return Command(pipeline.PipelineConfig, pipeline.run_pipeline, None)


COMMANDS: dict[str, Callable[[], Command]] = {"sft": _sft, "rlvr": _rlvr, "distill": _distill, "eval": _eval,
                                              "pipeline": _pipeline}
TRAINING = ("sft", "rlvr", "distill")  # the commands a pipeline stage may run
