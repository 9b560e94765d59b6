"""The math verifier's matching rules: is an extracted answer the gold answer?

`answers_match`: normalized string equality first; then, given the problem text, refusal of an
answer that only restates an expression of the problem (`restates_problem`: restating the question
is not answering it, even when the copy equals the gold in value); then math-verify. The worker
process that runs it (opsd/verifiers/worker.py) keeps adversarial output from hanging training.
"""

from __future__ import annotations

import functools
import re
import threading

from opsd.verifiers.answer import unwrap

_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
# Spaces only matter between two letters (`\pi r` must not become `\pir`).
_SPACE = re.compile(r" (?![A-Za-z])|(?<![A-Za-z]) ")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_WS = re.compile(r"\s+")


def normalize_answer(s: str) -> str:
    """Cheap, conservative normalization for the fast exact-match path."""
    s = _WS.sub(" ", s).strip().replace("\\$", "").strip("$").strip()
    s = unwrap(s, "\\text{").strip()
    s = _LEFT_RIGHT.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACE.sub("", _WS.sub(" ", s).strip())
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


# --- answers that restate the problem --------------------------------------------------------
# Math spans of a problem: `$..$`, `$$..$$`, `\(..\)`, `\[..\]`, align/equation/gather.
_SEGMENT_TOKEN = re.compile(
    r"\\\$|\$\$|\$|\\[()\[\]]|\\(?:begin|end)\{(?:align|equation|gather|multline)\*?\}"
)
_SEGMENT_CLOSE = {"$": "$", "$$": "$$", "\\(": "\\)", "\\[": "\\]"}
_THIN_SPACES = re.compile(r"\\[!,;: ]|\\displaystyle|&")
_SHORT_ARG = (
    (re.compile(r"\\frac(\d)(\d)"), r"\\frac{\1}{\2}"),  # `\frac 59` normalizes to `\frac59`
    (re.compile(r"\\frac(\d)\{"), r"\\frac{\1}{"),
    (re.compile(r"\\frac\{([^{}]*)\}(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\sqrt(\d)"), r"\\sqrt{\1}"),
)
# A plain number ("42", "-2.5", "1,000", "40\%", "90^\circ", "12^{\mathrm{th}}", "5\text{cm}")
# is never refused as restating the problem: the problem may well mention the answer, and no
# number is "less simplified" than an equal one.
_PLAIN_NUMBER = re.compile(
    r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)"
    r"(?:\\?%|\^\\circ|\^\{\\circ\}|st|nd|rd|th|\^\{?\\(?:mathrm|text)\{(?:st|nd|rd|th)\}\}?)?"
    r"(?:\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?)?"
)
_TRAILING_PUNCT = " \t\r\n.,;:?!"


def _split_top(s: str, seps: tuple[str, ...]) -> list[str]:
    """`s` split at each separator outside brackets (one linear pass)."""
    out, depth, last, i, n = [], 0, 0, 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\" and not s.startswith(seps, i):
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            for sep in seps:
                if s.startswith(sep, i):
                    out.append(s[last:i])
                    i = last = i + len(sep)
                    break
            else:
                i += 1
            continue
        i += 1
    out.append(s[last:])
    return out


def _problem_segments(problem: str) -> list[str]:
    """The math expressions written in `problem`: each math span, each of its lines (`\\\\`)
    and each side of an `=` in it, trailing punctuation dropped."""
    spans: list[str] = []
    opener, opened_at = "", 0
    for m in _SEGMENT_TOKEN.finditer(problem):
        t = m.group()
        if t == "\\$":
            continue
        if not opener:
            if t in _SEGMENT_CLOSE or t.startswith("\\begin"):
                opener, opened_at = t, m.end()
        elif t == _SEGMENT_CLOSE.get(opener, opener.replace("\\begin", "\\end")):
            spans.append(problem[opened_at : m.start()])
            opener = ""
    out: list[str] = []
    for span in spans:
        for line in _split_top(span, ("\\\\",)):
            sides = _split_top(line, ("=",))
            for part in [line, *sides] if len(sides) > 1 else [line]:
                part = part.strip().rstrip(_TRAILING_PUNCT)
                if part and part not in out:
                    out.append(part)
    return out


def _canon(s: str) -> str:
    """normalize_answer plus spacing commands dropped and `\\frac12` braced: for comparing an
    answer with the problem's expressions."""
    s = _THIN_SPACES.sub("", normalize_answer(s)).strip().rstrip(_TRAILING_PUNCT)
    for pattern, repl in _SHORT_ARG:
        s = pattern.sub(repl, s)
    return s.replace(" ", "")


@functools.lru_cache(maxsize=4096)
def _problem_keys(problem: str) -> frozenset[str]:
    return frozenset(_canon(seg) for seg in _problem_segments(problem[:100_000]))


def restates_problem(predicted: str, gold: str, problem: str | None) -> bool:
    """Whether `predicted` is refused for restating the problem: it copies a math expression
    written in `problem` (`\\boxed{ab+5b+2a+10}` for "Factor $ab+5b+2a+10$.", `2+3` for "What
    is $2+3$?") that the gold is not. Such an answer may equal the gold by value, but restating
    the question is not answering it. Plain numbers are never refused."""
    if not problem or not predicted:
        return False
    try:
        p = _canon(predicted)
        if not p or _PLAIN_NUMBER.fullmatch(p):
            return False
        if p == _canon(gold) or p in {_canon(side) for side in _split_top(gold, ("=",))}:
            return False
        return p in _problem_keys(problem)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        return False


def answers_match(
    predicted: str, gold: str, mv_timeout_s: int | None = 5, problem: str | None = None
) -> bool:
    """Whether `predicted` equals `gold`: normalized string equality, then (given the problem
    text) refusal of a restated problem expression (`restates_problem`), then math-verify."""
    try:
        if normalize_answer(predicted) == normalize_answer(gold):
            return True
        if restates_problem(predicted, gold, problem):
            return False
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


