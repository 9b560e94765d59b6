"""Answer extraction and correctness grading for model responses.

`extract_answer` pulls the final answer out of a response (last `\\boxed{}`/`\\fbox{}`,
last `Answer:` line, or GSM8K `#### N`, whichever comes last). `answers_match` compares it
to a gold answer: cheap normalized equality first, then math-verify. `Grader` runs the
math-verify path in a long-lived `spawn` worker process that is killed and restarted when
an item times out, so adversarial model output can never hang or crash training.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import sys
import threading
import types
import weakref
from typing import Any

# `\\.` eats escaped characters (`\{`, `\}`, `\\`) so they never count as braces.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
# Spaces only matter between two letters (`\pi r` must not become `\pir`).
_SPACE = re.compile(r" (?![A-Za-z])|(?<![A-Za-z]) ")
_WS = re.compile(r"\s+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d[\d,]*(?:\.\d+)?")
_MAIN_LOCK = threading.Lock()
_ANSWER_PREFIXES = ("final answer", "answer")
_DEPTH = {"{": 1, "}": -1}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _last_box(text: str) -> tuple[int, str] | None:
    """(start, content) of the last-starting balanced box, via one linear brace scan."""
    opens = {m.end() - 1: m.start() for m in _BOX_OPEN.finditer(text)}
    if not opens:
        return None
    best: tuple[int, str] | None = None
    stack: list[int] = []
    for tok in _BRACE_TOKEN.finditer(text, min(opens.values())):
        c = tok.group()
        if c == "{":
            stack.append(tok.start())
        elif c == "}" and stack:
            o = stack.pop()
            if o in opens and (best is None or opens[o] > best[0]):
                best = (opens[o], text[o + 1 : tok.start()].strip())
    return best


def _answer_line(line: str) -> str | None:
    """Content of an `Answer: X` / `**Final Answer:** X` line, else None (no regex: linear)."""
    s = line.strip().lstrip("#*_>- \t")
    head = s[:16].lower()
    for p in _ANSWER_PREFIXES:
        if head.startswith(p):
            rest = s[len(p) :].lstrip("*_ \t")
            if rest[:1] not in (":", "："):
                return None
            content = rest[1:].strip().strip("*_").strip().rstrip(".").strip()
            if len(content) >= 2 and content[0] == "$" and content[-1] == "$":
                content = content.strip("$").strip()
            elif content.startswith("\\(") and content.endswith("\\)"):
                content = content[2:-2].strip()
            return content or None
    return None


def _lines_with(text: str, haystack: str, needle: str) -> list[tuple[int, str]]:
    """(start, line) of each line containing `needle`; each line visited once, so linear."""
    out: list[tuple[int, str]] = []
    i = haystack.find(needle)
    while i >= 0:
        start = text.rfind("\n", 0, i) + 1
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        out.append((start, text[start:end]))
        i = haystack.find(needle, end)
    return out


def extract_answer(response: str) -> str | None:
    """The response's final answer, or None; the format occurring last in the text wins."""
    if not isinstance(response, str) or not response:
        return None
    candidates: list[tuple[int, str]] = []
    box = _last_box(response)
    if box is not None:
        candidates.append(box)
    # ASCII-only lowering keeps indices aligned (`"İ".lower()` is two characters).
    for pos, line in _lines_with(response, response.translate(_ASCII_LOWER), "answer"):
        ans = _answer_line(line)
        if ans is not None:
            candidates.append((pos, ans))
    for pos, line in _lines_with(response, response, "####"):
        h = line.rfind("####")
        # Markdown headers also start with `####`; GSM8K finals are always numeric.
        num = line[h + 4 :].strip().strip("$").strip().rstrip(".")
        if any(c.isdigit() for c in num) and all(c in "0123456789,.-" for c in num):
            candidates.append((pos + h, num.replace(",", "")))
    if not candidates:
        return None
    # An `Answer: \boxed{x}` line yields a box starting after the line start, so the box wins.
    return max(candidates, key=lambda c: c[0])[1]


def extract_last_number(text: str) -> str | None:
    """Last integer/decimal in `text`, commas dropped; fallback for marker-less references."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else last.group().replace(",", "")


def _unwrap(s: str, prefix: str) -> str:
    if s.startswith(prefix) and s.endswith("}"):
        depth = 0
        for i in range(len(prefix) - 1, len(s)):
            depth += _DEPTH.get(s[i], 0)
            if depth == 0:
                # Only unwrap when the wrapper's brace closes at the very end.
                return s[len(prefix) : -1] if i == len(s) - 1 else s
    return s


def normalize_answer(s: str) -> str:
    """Cheap, conservative normalization for the fast exact-match path."""
    s = _WS.sub(" ", s).strip().replace("\\$", "").strip("$").strip()
    s = _unwrap(s, "\\text{").strip()
    s = _LEFT_RIGHT.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACE.sub("", _WS.sub(" ", s).strip())
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def answers_match(predicted: str, gold: str, mv_timeout_s: int | None = 5) -> bool:
    """Whether `predicted` equals `gold`: normalized string equality, then math-verify."""
    try:
        if normalize_answer(predicted) == normalize_answer(gold):
            return True
        from math_verify import parse, verify

        # math-verify's timeouts use signal.alarm, which raises outside the main thread.
        if threading.current_thread() is not threading.main_thread():
            mv_timeout_s = None
        # Bare strings parse badly without delimiters (`1,2,3` -> 1.2), so wrap in `$...$`.
        g, p = (
            parse(f"${x.strip().strip('$')}$", parsing_timeout=mv_timeout_s)  # type: ignore[arg-type]
            for x in (gold, predicted)
        )
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=mv_timeout_s))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # math-verify's TimeoutException is a BaseException
        return False


def _worker_main(conn: Any, mv_timeout_s: int, memory_limit_mb: int | None) -> None:
    import signal

    # Ctrl-C goes to the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit_mb:
        import resource

        lim = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import math_verify  # noqa: F401 - pay the sympy import before reporting ready

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

    def grade_one(self, response: str, gold: str) -> bool:
        pred = extract_answer(response)
        if pred is None or len(pred) > self.max_answer_chars:
            return False
        if normalize_answer(pred) == normalize_answer(gold):
            return True  # decided here: no worker round-trip for the common case
        return self._ask_worker(pred, gold)

    def grade(self, responses: list[str], golds: list[str]) -> list[bool]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        return [self.grade_one(r, g) for r, g in zip(responses, golds)]

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
