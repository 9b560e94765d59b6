"""The exact-match verifier (BIG-Bench Hard): the final answer of a chain of thought, normalised,
equals the target.

Extraction (`extract_final_answer`), on the text after the last `</think>`: the last "the answer
is X" / "Answer: X" / "final answer: X" / "the correct option is X" statement or `\\boxed{X}`,
whichever comes last (BBH's own chains of thought end "So the answer is (B)."); without one, the
last non-empty line. Matching (`answers_match`): for a multiple-choice target "(B)", the option
letter the answer starts with ("(B)", "B", "B)", "(B) Monday", "Option B") or the option whose text
the answer repeats ("Monday" when the problem lists "(B) Monday"); otherwise `normalize` on both
sides: case, surrounding whitespace, punctuation and markdown, brackets and commas around word
lists ("[apple, pear]" = "apple pear"), thousands separators; numbers compare by value; answers
made only of symbols ignore spaces (Dyck words: "] ] >" = "]]>").

A hedged or multi-answer statement gives no answer, as in the math verifier: an answer that names
more than one option ("(A) or (D)", "(A) and (B)", "A/B", "B, not C"), starts with a hedge
("probably (B)", "either (A) ...", "not (C)") or goes on to hedge or retract it in its own
sentence ("(B), but I am not sure", "(A) is not correct"; the option's own text aside) matches no
option. Other targets need no such rule: the whole answer is compared, so "True or False" is not
"True".
"""

from __future__ import annotations

import re

from opsd.verifiers.answer import final_text, hedged

_STATEMENT = re.compile(
    r"\b(?:final\s+answer|answer|correct\s+(?:option|choice))\b[*_]*[ \t]*(?:is\b|:|=)[ \t*_:]*", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}\n]*)\}")
_OPTION = re.compile(r"\(([A-Z])\)")
_MARKED_OPTION = re.compile(r"(?:(?:option|choice)\s+\(?([A-Za-z])\)?|\(([A-Za-z])\)|([A-Za-z])\))(?=$|[\s.,:;])",
                            re.IGNORECASE)
_BARE_OPTION = re.compile(r"([A-Za-z])(?=$|[\s.,:;])")
_ANY_MARKED = re.compile(r"(?:\b(?:option|choice)\s+\(?([A-Za-z])\)?(?![\w'])|\(([A-Z])\)|(?<![\w(])([A-Z])\))",
                         re.IGNORECASE)
_BARE_LIST = re.compile(r"^([A-Za-z])\s*(?:[,/&]|\bor\b|\band\b)\s*(?:(?:but\s+)?not\s+)?\(?([A-Za-z])\)?"
                        r"(?=$|[\s.,:;])",
                        re.IGNORECASE)
_HEDGES = frozenset("probably likely maybe perhaps possibly presumably either not neither none unclear unsure "
                    "approximately about around roughly".split())
_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.+?)\s*$", re.MULTILINE)
_MARKDOWN = re.compile(r"\*\*|__|`|\$")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_EDGE = " \t\n.,;:!?\"'"


def extract_final_answer(response: str) -> str | None:
    """The response's final answer (see the module docstring), or None for an empty response."""
    text = final_text(response) if isinstance(response, str) else ""
    # (start, value start, value end): a statement's value runs to the end of its line, so a later
    # statement on the same line wins; values are cut out only for the candidates looked at
    spans = [(m.start(), m.end(), _line_end(text, m.end())) for m in _STATEMENT.finditer(text)]
    spans += [(m.start(), m.start(1), m.end(1)) for m in _BOXED.finditer(text)]
    for _, begin, end in sorted(spans, reverse=True):
        value = text[begin:end]
        if value.strip(_EDGE + "*_"):
            return _trimmed(value)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _trimmed(lines[-1]) if lines else None


def _line_end(text: str, start: int) -> int:
    end = text.find("\n", start)
    return len(text) if end < 0 else end


def _trimmed(value: str) -> str:
    """Without surrounding whitespace and bold markers, nor the full stop that ends the sentence."""
    return value.strip().strip("*_").strip().removesuffix(".").rstrip()


def normalize(text: str) -> str:
    """Case, whitespace, surrounding punctuation/markdown, list brackets and commas normalised away."""
    text = _MARKDOWN.sub("", text).strip().lower()
    if not any(c.isalnum() for c in text):
        return "".join(text.split())  # symbols only (Dyck words): spacing carries no meaning
    text = text.strip(_EDGE)
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if _THOUSANDS.fullmatch(text):
        return text.replace(",", "")
    words = (word.strip("\"'") for word in re.split(r"[\s,]+", text))
    return " ".join(word for word in words if word)


def options_of(problem: str) -> dict[str, str]:
    """{letter: normalised option text} of the "(A) ..." lines of a problem."""
    return {m.group(1): normalize(m.group(2)) for m in _OPTION_LINE.finditer(problem)}


def option_letter(answer: str, problem: str = "") -> str | None:
    """The option an answer names: a marked letter ("(B)", "B)", "Option B", "(B) Monday"), else
    the option whose text it repeats, else a bare leading letter ("B", "B."). None for an answer
    that names several options or hedges (the module docstring)."""
    cleaned = _MARKDOWN.sub("", answer).strip().strip(_EDGE)
    first = re.match(r"[A-Za-z]+", cleaned)
    if first and first.group().lower() in _HEDGES:
        return None
    named = {next(g for g in m.groups() if g).upper() for m in _ANY_MARKED.finditer(cleaned)}
    bare = _BARE_LIST.match(cleaned)
    if len(named) > 1 or (bare and bare.group(1).upper() != bare.group(2).upper()):
        return None
    marked = _MARKED_OPTION.match(cleaned)
    if marked:
        letter = next(letter for letter in marked.groups() if letter).upper()
        return None if _hedged_after(cleaned[marked.end():], letter, problem) else letter
    text = normalize(answer)
    named = [letter for letter, option in options_of(problem).items() if option == text]
    if len(named) == 1:
        return named[0]
    bare = _BARE_OPTION.match(cleaned)
    if bare is None or _hedged_after(cleaned[bare.end():], bare.group(1).upper(), problem):
        return None
    return bare.group(1).upper()


def _hedged_after(rest: str, letter: str, problem: str) -> bool:
    """Whether the words after the option hedge or retract it, its own text (which may say anything) aside."""
    text, option = normalize(rest), options_of(problem).get(letter)
    if option and option in text:
        text = text.replace(option, " ", 1)
    return hedged(text)


def answers_match(predicted: str | None, gold: str, problem: str = "") -> bool:
    """Whether the extracted answer equals the target (see the module docstring)."""
    if predicted is None or not predicted.strip():
        return False
    option = _OPTION.fullmatch(gold.strip())
    if option:
        return option_letter(predicted, problem) == option.group(1)
    left, right = normalize(predicted), normalize(gold)
    if left == right:
        return True
    if _NUMBER.fullmatch(left) and _NUMBER.fullmatch(right):
        return float(left) == float(right)
    return False
