"""The code verifier (HumanEval): does the response's code pass the problem's tests?

Extraction (`extract_code`), on the text after the last `</think>`: of the fenced blocks
(```python, ```py, ```python3 or a bare ```; an unclosed last fence runs to the end), the last one
that defines the entry point, else the last one; without a fenced block, the raw response (a
completion of the prompt), cut before a top-level `if __name__`, `print(`, `assert ` or fence.

The program (`program_for`), as HumanEval builds it: when the code defines `def <entry_point>(` at
the top level it is a full function, and it replaces the prompt's stub (the prompt's imports and
helper functions before the stub are kept); otherwise it is the body completing the prompt
(indented by four spaces when written flush left). The tests (`checks_for`) are the prompt (its
helpers, which HumanEval's tests call) and the row's `tests` (which define `check(candidate)`).
Unlike HumanEval's own harness, the two never share a process: the sandbox (opsd/verifiers/sandbox/)
runs the program in one and the tests in another, the judge, which calls the program's entry point
through a proxy; the response is correct when `check` returns there.
"""

from __future__ import annotations

import re

from opsd.verifiers.answer import final_text

_LANGUAGE = re.compile(r"[ \t]*([\w+-]*)")
_PYTHON_FENCES = ("", "python", "py", "python3")
_RAW_END = re.compile(r"^(?:if\s+__name__|print\(|assert\s|```)", re.MULTILINE)


def defines(code: str, entry_point: str) -> bool:
    """Whether `code` defines the function `entry_point` at its top level."""
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in one pass over the lines (linear in the text, whatever
    it holds): a block opens at a line starting (after spaces) with ``` and ending in a newline, its
    language the word after the fence; it closes at the next line starting with ```, or at the end."""
    blocks: list[tuple[str, str]] = []
    language, body_start, start = None, 0, 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        fence = text.startswith("```", start + len(text[start:end]) - len(text[start:end].lstrip(" \t")))
        if language is None and fence and end < len(text):
            indent = len(text[start:end]) - len(text[start:end].lstrip(" \t"))
            language = _LANGUAGE.match(text, start + indent + 3, end).group(1)
            body_start = end + 1
        elif language is not None and fence:
            blocks.append((language, text[body_start:start]))
            language = None
        start = end + 1
    if language is not None:
        blocks.append((language, text[body_start:]))
    return blocks


def extract_code(response: str, entry_point: str) -> str:
    """The code of a response (see the module docstring); "" when there is none."""
    text = final_text(response) if isinstance(response, str) else ""
    blocks = [body for language, body in fenced_blocks(text) if language.lower() in _PYTHON_FENCES]
    if blocks:
        defining = [block for block in blocks if defines(block, entry_point)]
        return (defining or blocks)[-1]
    if defines(text, entry_point):
        return text
    end = _RAW_END.search(text)
    return text[: end.start()] if end else text


def _as_body(code: str) -> str:
    lines = code.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        lines = [f"    {line}" if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def program_for(prompt: str, code: str, entry_point: str) -> str:
    """The candidate's program: the prompt completed by `code` (see the module docstring)."""
    if defines(code, entry_point):
        stub = re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", prompt, re.MULTILINE)
        return (prompt[: stub.start()] if stub else prompt) + "\n" + code
    return prompt + _as_body(code)


def checks_for(prompt: str, tests: str) -> str:
    """The judge's program: the prompt's helpers (its stub too, replaced by the proxy) and `check`."""
    return f"{prompt}\n\n{tests}\n"
