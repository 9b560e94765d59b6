"""Stopping for a cluster: a signal ends the run after its current step, with a checkpoint to resume from.

Clusters warn before they end a job: SLURM sends SIGTERM at the time limit or on preemption (then
SIGKILL after its KillWait, 30 s by default), and the signal of `#SBATCH --signal=USR1@300` that many
seconds before the end. During a training stage opsd catches SIGTERM and SIGUSR1: every process
finishes the step it is in, they agree at the step's end (one all-reduce, so a signal that reached one
process stops them all at the same step), the checkpoint of that step is written and the command exits
with status 75 (EX_TEMPFAIL: "try again") and one sentence saying so. The same command (or a
requeued job) continues from that checkpoint exactly as after a kill. A second signal of the same
kind ends the process at once, as if opsd had not caught the first.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from opsd.core.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL


class Preempted(UserError):
    """The run stopped on a signal after writing a checkpoint: exit status 75, not 2."""

    exit_code = PREEMPTED_EXIT


@contextlib.contextmanager
def catching_stop_signals() -> Iterator[list[str]]:
    """Within the block SIGTERM and SIGUSR1 are noted (their names, in the yielded list) instead of
    ending the process; a second one of a kind ends it as it would have. Outside the main thread (where
    Python cannot set handlers) nothing is caught."""
    received: list[str] = []

    def note(number: int, frame) -> None:
        name = signal.Signals(number).name
        if name in received:  # asked twice: stop now
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
        received.append(name)

    try:
        previous = {number: signal.signal(number, note) for number in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield received
        return
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
