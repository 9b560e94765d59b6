"""math-verify in a long-lived `spawn` worker process, killed and restarted when an item times out,
so adversarial model output can never hang or crash the trainer. `Grader` is what the math
verifier (opsd/verifiers/__init__.py) calls: extraction and cheap equality in this process, only
the math-verify path in the worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import types
import weakref
from typing import Any

from opsd.verifiers.answer import extract_answer
from opsd.verifiers.math import answers_match, normalize_answer, restates_problem  # noqa: F401

_MAIN_LOCK = threading.Lock()


def _worker_main(conn: Any, mv_timeout_s: int, memory_limit_mb: int | None) -> None:
    import signal

    # Ctrl-C goes to the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit_mb:
        import resource

        lim = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    __import__("math_verify")  # pay the sympy import before reporting ready

    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if msg is None:
            return
        conn.send(answers_match(msg[0], msg[1], mv_timeout_s))


class Grader:
    """Grades responses against gold answers without ever hanging the caller."""

    def __init__(
        self,
        timeout_s: float = 5.0,
        *,
        startup_timeout_s: float = 120.0,
        max_answer_chars: int = 2000,
        memory_limit_mb: int | None = 4096,
    ) -> None:
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_answer_chars = max_answer_chars
        self.memory_limit_mb = memory_limit_mb
        self.timeouts = 0  # items that hit timeout_s and got the worker killed
        self.crashes = 0  # items during which the worker died on its own
        self.restated = 0  # items refused for restating an expression of the problem
        self._proc: Any = None
        self._conn: Any = None
        # finalize runs at GC or interpreter exit, whichever comes first; it holds the
        # state dict, not self, so an unclosed Grader is still collected.
        self._finalizer = weakref.finalize(self, Grader._stop, self.__dict__)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork: the parent has torch/OpenMP threads
        parent, child = ctx.Pipe()
        # Inner signal timeout (int seconds) ends most slow sympy calls without a restart.
        mv_timeout = max(1, int(self.timeout_s) // 2)
        args = (child, mv_timeout, self.memory_limit_mb)
        proc = ctx.Process(target=_worker_main, args=args, daemon=True)
        with _MAIN_LOCK:
            # spawn re-imports the parent's __main__ in the child (re-running an unguarded
            # training script, importing torch); the worker needs none of it, so hide it.
            main = sys.modules["__main__"]
            sys.modules["__main__"] = types.ModuleType("__main__")
            try:
                proc.start()
            finally:
                sys.modules["__main__"] = main
        child.close()
        self._proc, self._conn, self._owner_pid = proc, parent, os.getpid()
        try:
            ok = parent.poll(self.startup_timeout_s) and parent.recv() == "ready"
        except (EOFError, OSError):
            ok = False
        if not ok:
            Grader._stop(self.__dict__)
            raise RuntimeError("grading worker failed to start")

    @staticmethod
    def _stop(state: dict[str, Any]) -> None:
        proc, conn = state.get("_proc"), state.get("_conn")
        state["_proc"] = state["_conn"] = None
        # A forked copy of this object (e.g. a DataLoader worker) must not touch our child.
        if proc is None or state.get("_owner_pid") != os.getpid():
            return
        try:
            conn.close()
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        except Exception:  # runs from finalizers at exit: never raise there
            pass

    def _ask_worker(self, pred: str, gold: str) -> bool:
        if self._proc is None or not self._proc.is_alive():
            Grader._stop(self.__dict__)
            self._start()
        try:
            self._conn.send((pred, gold))
            if self._conn.poll(self.timeout_s):
                return bool(self._conn.recv())
            self.timeouts += 1
        except (EOFError, OSError):  # worker died mid-item (poll() is also True on EOF)
            self.crashes += 1
        Grader._stop(self.__dict__)  # hung or dead: kill now, restart lazily on next item
        return False

    def grade_one(self, response: str, gold: str, problem: str | None = None) -> bool:
        """Whether `response` states `gold`; with `problem`, restating it is refused."""
        pred = extract_answer(response)
        if pred is None or len(pred) > self.max_answer_chars:
            return False
        if normalize_answer(pred) == normalize_answer(gold):
            return True  # decided here: no worker round-trip for the common case
        if restates_problem(pred, gold, problem):
            self.restated += 1
            return False
        return self._ask_worker(pred, gold)

    def grade(
        self, responses: list[str], golds: list[str], problems: list[str] | None = None
    ) -> list[bool]:
        """Grade each response against its gold; `problems` (the problem texts, optional)
        turns on the refusal of answers that restate the problem."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        if problems is not None and len(problems) != len(golds):
            raise ValueError(f"{len(problems)} problems but {len(golds)} golds")
        probs = problems if problems is not None else [None] * len(golds)
        return [self.grade_one(r, g, p) for r, g, p in zip(responses, golds, probs)]

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)  # polite stop; _stop() below is the backstop
                self._proc.join(1.0)
            except OSError:
                pass
        Grader._stop(self.__dict__)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
