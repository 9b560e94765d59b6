"""A testing hook for crash safety: the tests kill runs with SIGKILL at chosen moments (mid-generation,
after a step, while a checkpoint is being written) and check that the resumed run ends where an
uninterrupted one does."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_crash_counts: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Testing hook: with OPSD_CRASH_AT=name:N in the environment, the process kills itself (SIGKILL,
    as a cluster would) the N-th time it passes this point; with OPSD_CRASH_RANK=R too, only the
    process of that rank under torchrun; with OPSD_CRASH_SIGNAL=TERM (or USR1) it sends itself that
    signal instead, as a cluster ending the job would (runtime/preemption.py); with OPSD_STALL_S=S it
    sleeps S seconds instead (a process far behind the others). Does nothing otherwise."""
    wanted = os.environ.get("OPSD_CRASH_AT")
    if not wanted or wanted.rpartition(":")[0] != name:
        return
    if os.environ.get("OPSD_CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _crash_counts[name] += 1
    if _crash_counts[name] == int(wanted.rpartition(":")[2]):
        if os.environ.get("OPSD_STALL_S"):
            time.sleep(float(os.environ["OPSD_STALL_S"]))
            return
        os.kill(os.getpid(), signal.Signals["SIG" + os.environ.get("OPSD_CRASH_SIGNAL", "KILL")])
