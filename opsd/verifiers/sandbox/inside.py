"""Inside the sandbox: the judge, the candidate's server, and the plain data that crosses between them.

Two processes take part in grading one program (launcher.py starts both, confined):
  - the candidate runs the model's program (`serve`): the prompt's helpers and the model's code, and
    nothing of the tests. Then it answers calls to the entry point, one at a time, over two pipes.
  - the judge runs the row's tests (`judge`): the prompt (its helpers, e.g. HumanEval's `poly` or
    `encode_cyclic`) and `check(candidate)`, where `candidate` (and the entry point's own name) is
    a proxy that sends each call's arguments to the candidate and rebuilds its answer here. The
    judge never executes model-written code, and the verdict is the judge's: the candidate cannot
    reach its memory, its globals, its builtins or the pipe it reports on.
What crosses is plain data (`encode`/`decode`): None, bool, int, float, complex, str, bytes,
bytearray, list, tuple, dict, set, frozenset and range, nested. The judge rebuilds exactly those
builtin types from a JSON tree, so no object of the candidate's (an `__eq__` that always holds, a
subclass of int) ever exists on its side. A generator's items cross as a list and come back as an
iterator; any other object (an instance of the program's own class, a function, a module) cannot
cross, and the program is graded wrong with the reason "not plain data". An exception raised by
the candidate comes back as the nearest builtin exception class it derives from, with its message
(StopIteration and other flow-control exceptions as RuntimeError, so a test's `map`/`all` cannot be
cut short). Arguments are copies, but a list, dict, set or bytearray the function mutates is updated
in place on the judge's side after the call, and a function that returns one of its arguments
returns the tests' own object; the proxy's `__doc__` is the function's. What still differs from one
process: identity and shared state beyond that (an object the function keeps and returns again, which
the tests then mutate), a subclass of a builtin type (it comes back as that type), and anything the
candidate says of itself ("loaded", "callable"), which a program can send itself, as it could return
hard-coded answers.

Standard library only: this module runs in the sandbox's fresh interpreter (`python -I -S`).
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import traceback
import types

FRAME_LIMIT = 16 << 20  # bytes of one message between judge and candidate
DEPTH_LIMIT = 200  # nesting of one value
ITEMS_LIMIT = 1_000_000  # items of one generator collected
_FLOW = (StopIteration, StopAsyncIteration, GeneratorExit)


class NotPlain(Exception):
    """A value that cannot cross between candidate and judge as plain data."""


# --- plain data --------------------------------------------------------------------------------


def encode(value: object, depth: int = 0) -> object:
    """A JSON tree for `value` (candidate side: builtin subclasses go as their base type)."""
    if depth > DEPTH_LIMIT:
        raise NotPlain("nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return str.__str__(value) if isinstance(value, str) else value
    if isinstance(value, int):
        return {"i": int.__repr__(value)}
    if isinstance(value, float):
        return {"f": float.__repr__(value)}
    if isinstance(value, complex):
        return {"c": [float.__repr__(value.real), float.__repr__(value.imag)]}
    if isinstance(value, (bytes, bytearray)):
        return {"by" if isinstance(value, bytes) else "ba": bytes(value).hex()}
    if isinstance(value, range):
        return {"r": [value.start, value.stop, value.step]}
    tags = ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "fs"))
    for kind, tag in tags:
        if isinstance(value, kind):
            return {tag: [encode(item, depth + 1) for item in value]}
    if isinstance(value, dict):
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, types.GeneratorType):
        items = []
        for item in value:
            if len(items) >= ITEMS_LIMIT:
                raise NotPlain(f"a generator of more than {ITEMS_LIMIT} items")
            items.append(encode(item, depth + 1))
        return {"g": items}
    raise NotPlain(f"a {type(value).__name__} object")


def decode(tree: object, depth: int = 0) -> object:
    """The value of a JSON tree made by `encode`, built only of exact builtin types (judge side)."""
    if depth > DEPTH_LIMIT:
        raise NotPlain("nested too deeply")
    if tree is None or type(tree) in (bool, str):
        return tree
    if type(tree) is not dict or len(tree) != 1:
        raise NotPlain("not a value")
    (tag, body), = tree.items()
    if tag == "i" and type(body) is str:
        return int(body)
    if tag == "f" and type(body) is str:
        return float(body)
    if tag == "c" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if tag in ("by", "ba") and type(body) is str:
        return bytes.fromhex(body) if tag == "by" else bytearray.fromhex(body)
    if tag == "r" and type(body) is list and len(body) == 3 and all(type(x) is int for x in body):
        return range(*body)
    if type(body) is not list:
        raise NotPlain("not a value")
    items = [decode(item, depth + 1) for item in body] if tag != "d" else None
    if tag == "l":
        return items
    if tag == "t":
        return tuple(items)
    if tag in ("s", "fs"):
        return set(items) if tag == "s" else frozenset(items)
    if tag == "g":
        return iter(items)
    if tag == "d":
        pairs = [(decode(p[0], depth + 1), decode(p[1], depth + 1)) for p in body if type(p) is list and len(p) == 2]
        if len(pairs) != len(body):
            raise NotPlain("not a value")
        return dict(pairs)
    raise NotPlain("not a value")


# --- frames on a pipe ----------------------------------------------------------------------------


def send(fd: int, message: object) -> None:
    data = json.dumps(message, allow_nan=False).encode()
    data = len(data).to_bytes(8, "little") + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> object:
    """The next message, or None when the other side closed its end or broke the framing."""
    head = _read_exactly(fd, 8)
    size = int.from_bytes(head, "little") if head else -1
    if not 0 <= size <= FRAME_LIMIT:
        return None
    body = _read_exactly(fd, size)
    try:
        return json.loads(body) if body is not None else None
    except (ValueError, RecursionError):
        return None


# --- the candidate's side --------------------------------------------------------------------------

_MUTABLE = (list, dict, set, bytearray)


def _said(err: BaseException) -> list[object]:
    """[its class's name, its message, the name of the nearest builtin exception class it derives from]."""
    try:
        message = str(err)[:2000]
    except Exception:  # the program's own __str__
        message = ""
    base = next((k.__name__ for k in type(err).__mro__ if getattr(builtins, k.__name__, None) is k), "BaseException")
    return [type(err).__name__, message, base]


def serve(requests: int, replies: int) -> None:
    """Run the program sent first, then answer calls to its entry point until the judge hangs up.
    Runs in the confined candidate process; everything here after `exec` is the program's to change,
    which is why nothing here decides anything: whatever it sends is only data."""
    first = receive(requests)
    if not isinstance(first, dict):
        os._exit(0)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(first["program"], "program.py", "exec"), namespace)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as err:  # SystemExit too: the program did not run to its end
        if not isinstance(err, SystemExit):
            traceback.print_exc()
        send(replies, {"loaded": False, "raised": _said(err)})
        os._exit(0)
    function = namespace.get(first.get("entry_point") or "")
    doc = getattr(function, "__doc__", None)
    send(replies, {"loaded": True, "callable": callable(function), "doc": doc if isinstance(doc, str) else None})
    while True:
        call = receive(requests)
        if not isinstance(call, dict):
            os._exit(0)
        send(replies, _answer(function, call))


def _answer(function: object, call: dict) -> dict:
    """One call's reply: its result (or which argument it returned, by identity), the arguments it
    mutated as they are now, or the exception it raised."""
    try:
        args, kwargs = decode(call["args"]), decode(call["kwargs"])
        result = function(*args, **kwargs)
    except BaseException as err:  # it goes back to the judge as data
        return {"raised": _said(err)}
    reply: dict = {}
    try:
        same = [i for i, arg in enumerate(args) if arg is result and isinstance(arg, _MUTABLE)]
        reply["returned"] = {"argument": same[0]} if same else {"value": encode(result)}
        reply["arguments"] = [[i, encode(arg)] for i, arg in enumerate(args) if isinstance(arg, _MUTABLE)]
    except BaseException as err:  # NotPlain, or the program's own failure
        return {"unsupported": _said(err)[1] or type(err).__name__}
    return reply


# --- the judge's side ------------------------------------------------------------------------------


class Broken(BaseException):
    """The call could not be answered with plain data; the verdict is already "failed"."""


class Verdict:
    """The judge's word: passed or not, of which kind the failure is, and why in words."""

    def __init__(self, passed: bool, kind: str, reason: str):
        self.passed, self.kind, self.reason = passed, kind, reason  # kind: passed | tests | unsupported | program


class Candidate:
    """The judge's stand-in for the program's entry point: each call crosses to the candidate. Its
    `__doc__` is the function's own; arguments the function mutates are updated in place afterwards,
    and an argument it returns comes back as the very object the tests passed."""

    def __init__(self, requests: int, replies: int, name: str, doc: str | None):
        self.requests, self.replies = requests, replies
        self.__name__, self.__qualname__, self.__doc__ = name, name, doc
        self.broken = ""  # why the program failed outside the tests' own asserts
        self.kind = "program"

    def _break(self, reason: str, kind: str = "program") -> Broken:
        if not self.broken:
            self.broken, self.kind = reason, kind
        return Broken(reason)

    def __call__(self, *args: object, **kwargs: object) -> object:
        if self.broken:
            raise Broken(self.broken)
        try:
            message = {"args": encode(list(args)), "kwargs": encode(dict(kwargs))}
        except NotPlain as err:
            raise self._break(f"the tests pass an argument that is not plain data ({err})", "unsupported") from None
        try:
            send(self.requests, message)
        except OSError:
            raise self._break("the program's process ended during the tests") from None
        reply = receive(self.replies)
        if not isinstance(reply, dict):
            raise self._break("the program's process ended during the tests")
        if "raised" in reply and isinstance(reply["raised"], list) and len(reply["raised"]) == 3:
            raise rebuilt(*map(str, reply["raised"]))
        if "unsupported" in reply:
            raise self._break(f"not plain data: the entry point returned {str(reply['unsupported'])[:200]}",
                              "unsupported")
        try:
            self._write_back(args, reply.get("arguments", []))
            returned = reply["returned"]
            if "argument" in returned and type(returned["argument"]) is int and 0 <= returned["argument"] < len(args):
                return args[returned["argument"]]
            return decode(returned["value"])
        except (NotPlain, ValueError, TypeError, KeyError, RecursionError, MemoryError) as err:
            raise self._break(f"not plain data: {err}", "unsupported") from None

    @staticmethod
    def _write_back(args: tuple, arguments: object) -> None:
        """The tests' own list, dict, set or bytearray arguments, updated in place to what the call left."""
        if type(arguments) is not list:
            raise NotPlain("not a value")
        for item in arguments:
            index, value = item if type(item) is list and len(item) == 2 else (None, None)
            if type(index) is not int or not 0 <= index < len(args) or not isinstance(args[index], _MUTABLE):
                raise NotPlain("not a value")
            target, now = args[index], decode(value)
            if type(now) is not type(target):
                raise NotPlain("an argument came back as another type")
            if isinstance(target, (list, bytearray)):
                target[:] = now
            else:
                target.clear()
                target.update(now)


def rebuilt(name: str, message: str, base: str) -> Exception:
    """The exception the candidate raised, as the nearest builtin exception class it derives from (a
    program's own `class ValueError(Exception)` comes back as Exception), with its message; flow control
    and what is no builtin exception as RuntimeError (a StopIteration out of a call must not end a
    test's `map` or `all` early)."""
    kind = getattr(builtins, base, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, _FLOW):
        try:
            return kind(message)
        except Exception:  # exceptions whose constructor takes other arguments
            pass
    return RuntimeError(f"{name}: {message}")


def judge(job: dict, requests: int, replies: int) -> Verdict:
    """Send the program, then run the tests against the proxy. `job`: program, entry_point, tests
    (None: the program passes when it runs to its end)."""
    try:
        send(requests, {"program": job["program"], "entry_point": job.get("entry_point")})
    except OSError:
        return Verdict(False, "program", "the program's process ended before it started")
    hello = receive(replies)
    if not isinstance(hello, dict) or not hello.get("loaded"):
        raised = hello.get("raised") if isinstance(hello, dict) else None
        said = f": {raised[0]}" if isinstance(raised, list) and raised else ""
        return Verdict(False, "program", f"the program did not run to its end{said}")
    if job.get("tests") is None:
        return Verdict(True, "passed", "ran to its end")
    entry = job["entry_point"]
    if not hello.get("callable"):
        return Verdict(False, "program", f"the program defines no function '{entry}'")
    doc = hello.get("doc")
    candidate = Candidate(requests, replies, entry, doc if isinstance(doc, str) else None)
    namespace = {"__name__": "__judge__", "__builtins__": builtins}
    try:
        exec(compile(job["tests"], "tests.py", "exec"), namespace)
        namespace[entry] = candidate  # HumanEval's tests may call the entry point by its own name
        namespace["check"](candidate)
    except BaseException as err:  # any failure of the tests is a failed program
        if candidate.broken:
            return Verdict(False, candidate.kind, candidate.broken)
        return Verdict(False, "tests", f"the tests failed: {type(err).__name__}")
    if candidate.broken:  # a test that swallowed the proxy's error still fails
        return Verdict(False, candidate.kind, candidate.broken)
    return Verdict(True, "passed", "the tests passed")
