"""Finding the final answer in a response (the math verifier's extraction rules; docs/verifiers.md).

`extract_answer` reads only the text after the last `</think>` (an unclosed `<think>` hides
everything after it). Its candidates are the last `\\boxed{}`/`\\fbox{}`, `Answer:` lines, "the
(final) answer is X" sentences and GSM8K `#### N`; the one starting last wins. From each only the
leading answer expression is kept: trailing commentary ("10 (after subtracting the 42 used)", "10,
because ...", a next sentence) is dropped, never searched for a number, and a hedged or ambiguous
statement ("the answer is probably 12", "12 or 13") states no answer. Every scan is linear in the
length of the response.
"""

from __future__ import annotations

import re
from typing import Any

# `\\.` eats escaped characters (`\{`, `\}`, `\\`) so they never count as braces.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d[\d,]*(?:\.\d+)?")
_ANSWER_PREFIXES = ("final answer", "answer")
_DEPTH = {"{": 1, "}": -1}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# --- where the graded text is --------------------------------------------------------------
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"

# --- reading one answer expression -----------------------------------------------------------
_SCAN_LIMIT = 4096  # an answer expression is read from at most this many characters
_MAX_PARSES = 8  # candidates read, last first, before giving up: keeps extraction linear
_HEDGE_WINDOW = 300  # characters after the answer searched for hedges ("... but I am unsure")
_CMD = re.compile(r"\\(?:[A-Za-z]+|.)", re.DOTALL)
_WORD = re.compile(r"[A-Za-z]+")
# Letter runs that are words in running text; separators are one space, tab, `'` or `-`.
_TEXT_RUN = re.compile(r"[A-Za-z]+(?:[ \t'-][A-Za-z]+)*")
_DOLLAR = re.compile(r"(?<!\\)\$")
_MATH_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
# Runs of three or more letters are English words unless they are function names written
# without a backslash; among two-letter runs only these are (`ab`, `cm`, `pi` are not).
_MATH_FUNCS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp lim max min sup "
    "inf gcd lcm mod det dim ker deg sqrt frac infty cis".split()
)
_SHORT_WORDS = frozenset("is so as by or if of at it to be we an on in".split())
# Dropped before an answer: "the answer is exactly 42", "Answer: the ellipse".
_LEAD_INS = frozenset(
    "the exactly just simply then therefore thus hence so indeed precisely equal equals to "
    "clearly still now given by".split()
)
# An answer that starts with one of these is no final answer ("the answer is probably 12",
# "the answer is correct"): the statement is skipped and an earlier one may decide.
_HEDGES = frozenset(
    "probably likely maybe perhaps possibly presumably approximately approx about around "
    "roughly not either unclear unknown unsure uncertain somewhere between close nearly almost "
    "guess".split()
)
_NOT_ANSWERS = frozenset(
    "correct incorrect right wrong valid invalid verified confirmed consistent reasonable as "
    "above below shown found obtained that this these those clear same in at answer final".split()
)
# ... nor one whose own sentence goes on to hedge ("Answer: 12 (not sure)"), or whose own line goes
# on to retract or replace it ("Answer: 12 is wrong, it is 13", "the answer is 12. Wait, 13").
_TRAILING_HEDGES = frozenset(
    "unsure probably maybe perhaps might guess think uncertain possibly likely doubt".split()
)  # and "not sure" / "n't sure" ("makes sure" is no hedge)
_RETRACTIONS = frozenset("wrong incorrect mistake mistaken wait actually instead rather oops correction "
                         "scratch".split())
# and "not correct" / "not right"
# Words that end a textual answer ("Evelyn, because ...", "Evelyn has the best average").
_TEXT_STOPS = _SHORT_WORDS | frozenset(
    "the because since which where when while with for from after before but and that this was "
    "were are has have had will would can could should though although".split()
)
_AMBIGUOUS = frozenset(("or", "and"))  # "Answer: 12 or 13" is two answers, so none
# what starts a second answer after "or"/"and": a number, math, or "x =" ("7, and it holds" is one answer)
_ANOTHER_ANSWER = re.compile(r"[ \t]*(?:[-+]?\d|\$|\\[A-Za-z(\[]|\(|[A-Za-z][ \t]*=)")
_OPERATORS = frozenset("+-*/=^_,<>:&;")

# --- "the (final) answer is X" -------------------------------------------------------------
_PHRASE = "answer is"
_PHRASE_BACK = 48
# What may come right before "answer is" (text ASCII-lowered): "the/my/our", "final/correct/
# complete", at the start of a line or sentence or after a conclusion word. "If the answer is
# 5" and "I think the answer is 5" are not final-answer statements.
_PHRASE_CONTEXT = re.compile(
    r"(?:^|[.!?:;>#*\n]|\b(?:so|thus|therefore|hence|consequently|finally|overall|conclusion"
    r"|summary))[ \t,*_]*(?:(?:the|my|our)[ \t]+)?(?:(?:final|correct|complete)[ \t]+)?$"
)


def final_text(response: str) -> str:
    """The graded part of a response: the text after the last `</think>`, cut at an unclosed
    `<think>` (a response that never closes its thinking states no answer)."""
    end = response.rfind(_THINK_CLOSE)
    if end >= 0:
        response = response[end + len(_THINK_CLOSE) :]
    start = response.find(_THINK_OPEN)
    return response if start < 0 else response[:start]


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


def _scan_math(s: str, line: bool) -> tuple[int, bool]:
    """(end of the leading math expression of `s`, whether it is followed by "or"/"and").

    One linear pass tracking bracket depth. At depth 0 the expression ends at: a `(` or `[`
    after a space that follows an operand ("10 (after ...)"; "(0,9) \\cup (9,36)" and
    "f(x)" go on), a bracketed group containing an English word ("10(after ...)"), an
    English word after an operand or a comma ("18 dollars", "42, which ..."), a sentence end
    (". " or end of text, "?", ";"), a line break (`\\\\`; a newline when `line`), `**`, or a
    dash. Inside `{}`, `\\text{}` and `\\begin..\\end` nothing ends it.
    """
    n, i, depth = len(s), 0, 0
    group, group_words = -1, False  # start of the open top-level (...)/[...] after content
    content = False  # a non-space character seen
    last_op = True  # the last token was an operator, command or opening bracket
    last_char = ""
    while i < n:
        c = s[i]
        if c == "\\":
            m = _CMD.match(s, i)
            tok = m.group() if m else c
            if tok == "\\\\":
                if depth == 0 and content:
                    return i, False
            elif tok in ("\\{", "\\begin"):
                depth += 1
            elif tok in ("\\}", "\\end"):
                depth = max(0, depth - 1)
            elif tok in ("\\left", "\\right") and s.startswith(".", i + len(tok)):
                i += 1  # `\left.` is an invisible delimiter, not a full stop
            i += len(tok)
            content, last_op, last_char = True, True, "\\"
            continue
        if c.isascii() and c.isalpha():
            j = _WORD.match(s, i).end()  # type: ignore[union-attr]
            w = s[i:j].translate(_ASCII_LOWER)
            english = (len(w) >= 3 and w not in _MATH_FUNCS) or w in _SHORT_WORDS
            if english and i > 0 and s[i - 1] in " \t\r\n,;(":
                # After an operand or a command ("90^\\circ because"); after an operator only
                # a function word ends it ("10 - the 42 ...", but "x + abc" goes on).
                after_operand = not last_op or last_char in ",;\\" or w in _TEXT_STOPS
                if depth == 0 and content and after_operand:
                    return i, w in _AMBIGUOUS and _ANOTHER_ANSWER.match(s, j) is not None
                if group >= 0:
                    group_words = True
            i, content, last_op, last_char = j, True, False, "a"
            continue
        if c in "([":
            if depth == 0 and content:
                if s[i - 1] in " \t\r\n" and not last_op:
                    return i, False
                group, group_words = i, False
            depth += 1
        elif c == "{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
            if depth == 0 and group >= 0:
                if group_words:
                    return group, False
                group = -1
        elif depth == 0 and content:
            if c == "." and (i + 1 == n or s[i + 1].isspace()):
                return i, False
            if c in "?;—–" or (c == "\n" and line) or s.startswith("**", i):
                return i, False
        if c.isspace() or c == "$":
            i += 1
            continue
        content, last_char = True, c
        last_op = c in _OPERATORS or c in "([{"
        i += 1
    return n, False


def _clean(ans: str) -> str:
    ans = _DOLLAR.sub("", ans).strip().rstrip(" \t\r\n.,;:*_")
    while ans.endswith((" -", " --", " —", " –")):
        ans = ans.rstrip(" -—–")
    for box in ("\\boxed{", "\\fbox{"):
        ans = unwrap(ans, box).strip()
    return ans


def _find_unescaped(s: str, needle: str, start: int) -> int:
    """`s.find(needle, start)` skipping occurrences escaped by a backslash (`\\$`)."""
    j = s.find(needle, start)
    while j > 0 and s[j - 1] == "\\" and needle[0] == "$":
        j = s.find(needle, j + 1)
    return j


def hedged(rest: str) -> bool:
    """Whether what follows an answer hedges it in its sentence ("... but I am unsure") or retracts or
    replaces it in its line ("... is wrong, it is 13", "... . Wait, 13"). Shared by the verifiers:
    such a statement states no answer."""
    rest = rest[:_HEDGE_WINDOW]
    line = rest.split("\n", 1)[0]
    sentence = line.split(". ", 1)[0]
    said = _WORD.findall(sentence.translate(_ASCII_LOWER))
    lined = _WORD.findall(line.translate(_ASCII_LOWER))
    not_sure = any(w == "sure" and before in ("not", "t") for before, w in zip(said, said[1:]))
    not_right = any(w in ("correct", "right") and before in ("not", "t") for before, w in zip(lined, lined[1:]))
    return not_sure or not_right or not _TRAILING_HEDGES.isdisjoint(said) or not _RETRACTIONS.isdisjoint(lined)


def _lead_answer(text: str, start: int = 0, line: bool = True) -> str | None:
    """The answer expression at `text[start:]`, or None when none is stated there.

    Keeps only the leading expression: a `$..$`/`\\(..\\)`/`\\[..\\]` span, a bare math
    expression or a short textual answer ("Evelyn"); trailing commentary is dropped, never
    searched for numbers. None for hedged ("probably 12", "12 (not sure)"), ambiguous
    ("12 or 13"), empty or non-answers ("correct"). When `line` and the marker's own line is
    empty, the answer may stand on the next non-blank line.
    """
    s = text[start : start + _SCAN_LIMIT]
    k, n = 0, len(s)
    while k < n and s[k] in " \t*_":
        k += 1
    if line and (k == n or s[k] in "\r\n"):
        while k < n and s[k] in " \t\r\n*_":
            k += 1
    s = s[k:]
    if not s:
        return None
    for op, cl in _MATH_DELIMS:
        if s.startswith(op):
            j = _find_unescaped(s, cl, len(op))
            if j < 0 and op == "$":  # a currency sign: "$18 per day"
                s = s[1:]
                break
            if j < 0:
                return None
            inner, rest = s[len(op) : j].strip(), s[j + len(cl) :]
            end, ambiguous = _scan_math(inner, line=False)
            after = rest.lstrip(" \t,")
            nxt = _WORD.match(after)  # "$12$ or $13$"
            if nxt is not None and nxt.group().translate(_ASCII_LOWER) in _AMBIGUOUS:
                ambiguous = ambiguous or _ANOTHER_ANSWER.match(after, nxt.end()) is not None
            if ambiguous or hedged(inner[end:] + " " + rest):
                return None
            return _clean(inner[:end]) or None
    # Lead-in words before the answer: "exactly 42", "the ellipse".
    while True:
        m = _WORD.match(s)
        if not m or s[m.end() : m.end() + 1] not in (" ", "\t"):
            break
        w = m.group().translate(_ASCII_LOWER)
        if w not in _LEAD_INS:
            break
        s = s[m.end() :].lstrip(" \t")
    m = _WORD.match(s)
    first = m.group().translate(_ASCII_LOWER) if m else ""
    if first in _HEDGES or first in _NOT_ANSWERS:
        return None
    second = _WORD.match(s, m.end() + 1) if m and s[m.end() : m.end() + 1] == " " else None
    if (
        (len(first) >= 3 and first not in _MATH_FUNCS)
        or first in _SHORT_WORDS
        or (len(first) == 2 and second is not None and len(second.group()) >= 3)  # "No solution"
    ):
        # A textual answer: its words up to a stop word or punctuation.
        run = _TEXT_RUN.match(s)
        if run is None:  # cannot happen: s starts with a letter
            return None
        words = _WORD.findall(run.group())
        keep: list[str] = []
        for w in words:
            lw = w.translate(_ASCII_LOWER)
            if lw in _TEXT_STOPS:
                if lw in _AMBIGUOUS:
                    return None
                break
            keep.append(w)
        if not keep:
            return None
        after = s[run.end() :].lstrip(" \t") if len(keep) == len(words) else ""
        if after[:1].isdigit() or after[:1] in ("\\", "$"):
            return None  # words leading into math ("option 3"): not a textual answer
        if hedged(s[run.end() :]):
            return None
        return " ".join(keep)
    end, ambiguous = _scan_math(s, line)
    if ambiguous or hedged(s[end:]):
        return None
    return _clean(s[:end]) or None


def _answer_line(line: str) -> int | None:
    """Offset in `line` where the answer of an `Answer: X` / `**Final Answer:** X` line starts,
    else None (no regex: linear)."""
    s = line.lstrip("#*_>- \t")
    off = len(line) - len(s)
    head = s[:16].translate(_ASCII_LOWER)
    for p in _ANSWER_PREFIXES:
        if head.startswith(p):
            rest = s[len(p) :].lstrip("*_ \t")
            if rest[:1] not in (":", "："):
                return None
            return off + len(s) - len(rest) + 1
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


def _phrases(lower: str) -> list[int]:
    """Offsets just after each "the (final) answer is" statement in ASCII-lowered text."""
    out = []
    i = lower.find(_PHRASE)
    while i >= 0:
        j = i + len(_PHRASE)
        nxt = lower[j : j + 1]
        if (nxt == "" or nxt in " \t\r\n:*") and _PHRASE_CONTEXT.search(
            lower, max(0, i - _PHRASE_BACK), i
        ):
            while lower[j : j + 1] in ("*", "_"):  # "the answer is**: 42"
                j += 1
            out.append(j + 1 if lower[j : j + 1] in (":", "：") else j)
        i = lower.find(_PHRASE, j)
    return out


def extract_answer(response: str) -> str | None:
    """The response's final answer, or None.

    Only `final_text` (after the last `</think>`) is read. Candidates: the last `\\boxed{}`/
    `\\fbox{}`, each `Answer:`/`Final Answer:` line, each "the (final) answer is X" statement
    and each GSM8K `#### N`; the one starting last in the text wins. A candidate stating no
    clean answer (hedged, ambiguous, empty) is skipped in favour of the one before it.
    """
    if not isinstance(response, str) or not response:
        return None
    text = final_text(response)
    if not text:
        return None
    lower = text.translate(_ASCII_LOWER)  # ASCII-only lowering keeps indices aligned
    # (position, kind, offset): kind "box" carries its content, the others an offset.
    candidates: list[tuple[int, str, Any]] = []
    box = _last_box(text)
    if box is not None:
        candidates.append((box[0], "box", box[1]))
    for pos, line in _lines_with(text, lower, "answer"):
        off = _answer_line(line)
        if off is not None:
            candidates.append((pos, "at", pos + off))
    for off in _phrases(lower):
        candidates.append((off - 1, "at", off))
    for pos, line in _lines_with(text, text, "####"):
        h = line.rfind("####")
        # Markdown headers also start with `####`; GSM8K finals are always numeric.
        num = line[h + 4 :].strip().strip("$").strip().rstrip(".")
        if any(c.isdigit() for c in num) and all(c in "0123456789,.-" for c in num):
            candidates.append((pos + h, "num", num.replace(",", "")))
    # An `Answer: \boxed{x}` line yields a box starting after the line start, so the box wins.
    candidates.sort(key=lambda c: c[0], reverse=True)
    for _, kind, value in candidates[:_MAX_PARSES]:
        if kind == "num":
            return value
        ans = _lead_answer(value, 0, line=False) if kind == "box" else _lead_answer(text, value)
        if ans is not None:
            return ans
    return None


def extract_last_number(text: str) -> str | None:
    """Last integer/decimal in `text`, commas dropped; fallback for marker-less references."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else last.group().replace(",", "")


def unwrap(s: str, prefix: str) -> str:
    if s.startswith(prefix) and s.endswith("}"):
        depth = 0
        for i in range(len(prefix) - 1, len(s)):
            depth += _DEPTH.get(s[i], 0)
            if depth == 0:
                # Only unwrap when the wrapper's brace closes at the very end.
                return s[len(prefix) : -1] if i == len(s) - 1 else s
    return s
