"""The code verifier's verdict cannot be forged: wrong programs that try every way we know to make the grader
report a pass (the runner's secrets, outliving the limit, tracing hooks, objects that equal everything, patched
builtins, reading the answers from disk, flow-control exceptions) are graded wrong, and plain data crosses between
the candidate and the judge as exactly the builtin values it stands for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from opsd.core.data import Problem
from opsd.verifiers import VerifierConfig, Verifiers
from opsd.verifiers.sandbox import run_tests
from opsd.verifiers.sandbox.inside import NotPlain, decode, encode, rebuilt

ALLOW = VerifierConfig(allow_code_execution=True, code_timeout_s=3.0)
SQUARE_PROMPT = 'def square(x: int) -> int:\n    """x times x."""\n'
SQUARE_TESTS = ("def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(4) == 16\n"
                "    assert candidate(-2) == 4\n")


def square_problem(tests: str = SQUARE_TESTS) -> Problem:
    return Problem("square", SQUARE_PROMPT, None, "    return x * x\n",
                   {"verifier": "code", "entry_point": "square", "tests": tests})


def grade(code: str, tests: str = SQUARE_TESTS, config: VerifierConfig = ALLOW):
    with Verifiers(config) as verifiers:
        verdict, = verifiers.verify([f"```python\n{code}\n```"], [square_problem(tests)])
        return verdict, verifiers.counters()


# Each program's `square` is wrong (it returns x + 1); each tries to make the grader report a pass anyway.
FORGERIES = {
    "write every secret-looking string of the process to every open descriptor": """
import gc, os, re, sys
def square(x):
    found = set()
    for obj in gc.get_objects():
        if isinstance(obj, dict):
            found.update(v for v in obj.values() if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v))
    frame = sys._getframe()
    while frame:
        found.update(v for v in frame.f_globals.values() if isinstance(v, (str, bytes)))
        frame = frame.f_back
    for fd in range(3, 256):
        for secret in found:
            for text in (f"pass {secret}\\n", secret):
                try:
                    os.write(fd, text.encode() if isinstance(text, str) else text)
                except OSError:
                    pass
    return x + 1
""",
    "write a pass to every descriptor, then outlive the time limit": """
import os, time
def square(x):
    for fd in range(256):
        try:
            os.write(fd, b"pass 00000000000000000000000000000000\\nthe tests passed")
        except OSError:
            pass
    time.sleep(60)
""",
    "a tracing hook that replaces the test function": """
import sys
def _tracer(frame, event, arg):
    if frame.f_code.co_name == "check":
        frame.f_globals["check"] = lambda candidate: None
        frame.f_globals["AssertionError"] = None
    return _tracer
sys.settrace(_tracer)
sys.setprofile(_tracer)
import threading
threading.settrace(_tracer)
def square(x):
    return x + 1
""",
    "an object whose comparisons always hold": """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __hash__(self): return 0
def square(x):
    return Anything()
""",
    "an int whose comparisons always hold": """
class Sly(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = int.__hash__
def square(x):
    return Sly(x + 1)
""",
    "patched builtins the tests use": """
import builtins
class Quiet(Exception):
    pass
builtins.AssertionError = Quiet
builtins.abs = lambda value: 0
builtins.isinstance = lambda *args: True
builtins.__build_class__ = None
def square(x):
    return x + 1
""",
    "read the answers from the data file on disk": """
import glob, json, os
def square(x):
    for pattern in DATA_PATTERNS:
        for path in glob.glob(pattern, recursive=True):
            try:
                with open(path) as handle:
                    text = handle.read()
            except OSError:
                continue
            for line in text.splitlines():
                row = json.loads(line)
                if row.get("entry_point") == "square":
                    namespace = {}
                    exec(SQUARE_PROMPT + row["solution"], namespace)
                    return namespace["square"](x)
    return x + 1
""",
    "StopIteration to cut a test's map short": """
def square(x):
    raise StopIteration
""",
    "a generator of objects that equal everything": """
class Anything:
    def __eq__(self, other): return True
def square(x):
    yield Anything()
""",
    "exit as soon as called": """
import os
def square(x):
    os._exit(0)
""",
    "SystemExit as soon as called": """
def square(x):
    raise SystemExit(0)
""",
    "kill every process it can name": """
import os, signal
def square(x):
    for pid in [os.getppid(), -1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    return x + 1
""",
    "an answer too big to cross": """
def square(x):
    return "9" * (64 << 20)
""",
    "patch the sandbox's own code in its process": """
import sys
for module in list(sys.modules.values()):
    for name in ("encode", "judge", "decode"):
        if hasattr(module, name):
            try:
                setattr(module, name, lambda *a, **k: {"i": "9"})
            except Exception:
                pass
def square(x):
    return x + 1
""",
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_wrong_programs_cannot_forge_a_pass(name, tmp_path):
    # answers on disk where the grader's user can read them: a data file holding the right solution
    data = tmp_path / "humaneval_like.jsonl"
    data.write_text(json.dumps({"entry_point": "square", "solution": "    return x * x\n"}) + "\n")
    data.chmod(0o644)
    tmp_path.chmod(0o755)
    patterns = [str(data), str(Path(__file__).resolve().parents[3] / "shared" / "data" / "*.jsonl"),
                str(Path(__file__).resolve().parents[2] / "**" / "*.jsonl")]
    code = FORGERIES[name].replace("DATA_PATTERNS", repr(patterns)).replace("SQUARE_PROMPT", repr(SQUARE_PROMPT))
    tests = SQUARE_TESTS
    if "map" in name:
        tests = ("def check(candidate):\n    assert all(map(candidate, [1, 2, 3])) or True\n"
                 "    assert list(map(candidate, [3])) == [9]\n")
    verdict, counters = grade(code, tests)
    assert verdict.correct is False and verdict.reward == 0.0
    assert counters["sandbox_errors"] == 0


def test_the_data_file_forgery_works_where_reads_are_not_confined(tmp_path):
    """The control for the disk forgery above: without the view and Landlock (the two walls that confine
    reads) the same wrong program reads the answer and passes, so that test measures the walls."""
    data = tmp_path / "humaneval_like.jsonl"
    data.write_text(json.dumps({"entry_point": "square", "solution": "    return x * x\n"}) + "\n")
    data.chmod(0o644)
    tmp_path.chmod(0o755)
    code = FORGERIES["read the answers from the data file on disk"].replace("DATA_PATTERNS", repr([str(data)]))
    code = code.replace("SQUARE_PROMPT", repr(SQUARE_PROMPT))
    tests = "def check(candidate):\n    assert candidate(3) == 9\n"
    assert run_tests(code, tests, "square", skip_layers=("namespaces", "landlock")).passed
    assert run_tests(code, tests, "square").status == "failed"


def test_the_same_programs_with_a_right_answer_pass():
    """The forgeries fail for their wrong answer, not because the machinery refuses them: the right function
    next to the same tricks passes (the tricks that break the candidate's own process aside)."""
    right = "\ndef square(x):\n    return x * x\n"
    for name in ("a tracing hook that replaces the test function",
                 "write every secret-looking string of the process to every open descriptor"):
        code = FORGERIES[name].replace("def square(x):", "def _wrong(x):") + right
        assert grade(code)[0].correct, name
    assert grade("import builtins\nbuiltins.AssertionError = KeyError\nbuiltins.abs = None\n" + right)[0].correct
    assert grade("def square(x):\n    return x * x\n")[0].correct


def test_a_map_of_flow_control_is_not_a_pass():
    outcome = run_tests("def square(x):\n    raise StopIteration\n",
                        "def check(candidate):\n    assert all(map(candidate, [1, 2, 3]))\n    assert 0\n", "square")
    assert outcome.status == "failed" and "RuntimeError" in outcome.reason


def test_unsupported_results_are_counted_and_generators_cross_as_iterators():
    verdict, counters = grade("class Box:\n    pass\ndef square(x):\n    return Box()\n")
    assert not verdict.correct and counters["code_unsupported"] == 1
    tests = "def check(candidate):\n    assert list(candidate(3)) == [0, 1, 4]\n"
    assert grade("def square(n):\n    for i in range(n):\n        yield i * i\n", tests)[0].correct


def test_exceptions_cross_as_builtins_and_tests_may_expect_them():
    tests = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError as err:\n"
             "        assert 'negative' in str(err)\n    else:\n        assert False\n    assert candidate(3) == 9\n")
    assert grade("def square(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x * x\n",
                 tests)[0].correct
    assert not grade("def square(x):\n    if x < 0:\n        raise KeyError('negative')\n    return x * x\n",
                     tests)[0].correct


def test_tests_that_call_the_entry_point_by_name_and_the_prompts_helpers():
    """HumanEval's tests call prompt helpers (poly, encode_cyclic) and, in one case, the entry point by name."""
    prompt = "def double(x):\n    return 2 * x\n\n\ndef quadruple(x):\n    \"\"\"4x.\"\"\"\n"
    tests = "def check(candidate):\n    assert candidate(3) == double(double(3))\n    assert quadruple(2) == 8\n"
    problem = Problem("q", prompt, None, None, {"verifier": "code", "entry_point": "quadruple", "tests": tests})
    with Verifiers(ALLOW) as verifiers:
        right, wrong, sly = verifiers.verify(
            ["    return double(double(x))\n", "    return 3 * x\n",
             "```python\ndef double(x):\n    return 0\ndef quadruple(x):\n    return 0\n```"], [problem] * 3)
    assert right.correct and not wrong.correct and not sly.correct  # the candidate's own `double` is not the tests'


# --- plain data -----------------------------------------------------------------------------------------

VALUES = [None, True, False, 0, -7, 10 ** 40, 1.5, -0.0, float("inf"), 3 + 4j, "", "héllo\n", b"\x00\xff",
          bytearray(b"ab"), [1, [2, (3,)]], (1, "a"), {1: "a", (2, 3): [4]}, {1, 2}, frozenset({"x"}), range(2, 9, 3),
          {"nested": {"deep": [{"k": (None, 1.25)}]}}]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_plain_values_cross_unchanged_with_their_exact_types(value):
    back = decode(json.loads(json.dumps(encode(value))))
    assert back == value and type(back) is type(value)


def test_nan_crosses_and_subclasses_become_their_base_type():
    assert math.isnan(decode(encode(float("nan"))))

    class Sly(int):
        def __eq__(self, other):
            return True

    back = decode(encode(Sly(3)))
    assert type(back) is int and back == 3 and back != 4
    assert type(decode(encode(True))) is bool


@pytest.mark.parametrize("tree", [[1, 2], {"l": [1]}, {"x": 1}, {"i": 3}, {"l": [1, 2], "t": []}, 5, 1.5,
                                  {"d": [[{"l": []}, 1]]}, {"s": [{"l": []}]}, {"r": [1, "2", 3]}])
def test_trees_that_are_not_values_are_refused(tree):
    with pytest.raises((NotPlain, TypeError)):
        decode(tree)


def test_objects_that_are_not_plain_data_are_refused_by_the_encoder():
    for value in (object(), lambda: 1, Path("."), iter([1]), [1, object()]):
        with pytest.raises(NotPlain):
            encode(value)
    deep = []
    for _ in range(500):
        deep = [deep]
    with pytest.raises(NotPlain):
        encode(deep)


def test_exceptions_are_rebuilt_only_as_builtin_non_flow_exceptions():
    assert type(rebuilt("ValueError", "m", "ValueError")) is ValueError and str(rebuilt("ValueError", "m",
                                                                                        "ValueError")) == "m"
    assert type(rebuilt("ValueError", "m", "Exception")) is Exception  # a program's own class named ValueError
    assert type(rebuilt("MyError", "m", "KeyError")) is KeyError  # a subclass: its nearest builtin base
    for base in ("StopIteration", "StopAsyncIteration", "GeneratorExit", "SystemExit", "KeyboardInterrupt",
                 "MyError", "print", "UnicodeDecodeError", "BaseException"):
        assert type(rebuilt("X", "m", base)) is RuntimeError, base


# Wrong programs that pass when program and tests cross only as copies, from an independent red team:
# each fails when they share one process, and must fail here too.
SAME_PROCESS = {
    "sorts its argument in place": ("def sorted_copy(xs):\n    xs.sort()\n    return xs\n", "sorted_copy",
                                    "def check(candidate):\n    xs = [3, 1, 2]\n    assert candidate(xs) == [1, 2, 3]\n"
                                    "    assert xs == [3, 1, 2]\n"),
    "returns its argument itself": ("def copy_list(xs):\n    return xs\n", "copy_list",
                                    "def check(candidate):\n    xs = [1, 2]\n    ys = candidate(xs)\n"
                                    "    assert ys == xs and ys is not xs\n"),
    "raises its own class named ValueError": (
        "class ValueError(Exception):\n    pass\ndef parse(text):\n    raise ValueError(text)\n", "parse",
        "def check(candidate):\n    try:\n        candidate('x')\n    except ValueError:\n        pass\n"
        "    else:\n        assert False\n"),
    "has no docstring": ("def documented(x):\n    return x\n", "documented",
                         "def check(candidate):\n    assert candidate.__doc__\n"),
    "mutates a dict and a set it is given": (
        "def clean(d, s):\n    d.clear()\n    s.add(9)\n    return len(d)\n", "clean",
        "def check(candidate):\n    d, s = {1: 2}, {1}\n    assert candidate(d, s) == 0\n    assert d == {1: 2} and s "
        "== {1}\n"),
}


@pytest.mark.parametrize("name", list(SAME_PROCESS))
def test_what_one_process_would_see_of_arguments_exceptions_and_docstrings(name):
    program, entry, tests = SAME_PROCESS[name]
    assert run_tests(program, tests, entry).status == "failed", name


def test_mutated_and_returned_arguments_and_docstrings_are_the_functions_own():
    """The same tests pass for the right programs: in-place updates, the argument itself, a real docstring."""
    tests = ("def check(candidate):\n    xs = [3, 1, 2]\n    ys = candidate(xs)\n    assert ys is xs and xs == [1, 2, "
             "3]\n"
             "    assert candidate.__doc__ == 'Sorts in place.' and candidate.__name__ == 'sort_in_place'\n")
    program = "def sort_in_place(xs):\n    'Sorts in place.'\n    xs.sort()\n    return xs\n"
    assert run_tests(program, tests, "sort_in_place").passed
    raising = "def parse(text):\n    raise ValueError(text)\n"
    tests = ("def check(candidate):\n    try:\n        candidate('x')\n    except ValueError as err:\n"
             "        assert str(err) == 'x'\n    else:\n        assert False\n")
    assert run_tests(raising, tests, "parse").passed


def test_a_program_cannot_make_its_crash_count_as_unsupported():
    """The counters read the judge's kind of failure, not words in the reason a program can choose."""
    verdict, counters = grade("class E(Exception):\n    pass\nE.__name__ = 'not plain data'\nraise E()\n"
                              "def square(x):\n    return x * x\n")
    assert not verdict.correct and counters["code_unsupported"] == 0
