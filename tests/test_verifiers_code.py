"""The code verifier (HumanEval) and its sandbox: code extraction, the program HumanEval runs, the canonical
solutions passing and rotated ones failing, hostile programs whose effects must not happen (each run by a
separate "trainer" process that must survive), each isolation layer alone, a fuzz bound, and the opt-in."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd.data import Problem, load_problems
from opsd.errors import UserError
from opsd.verifiers import VerifierConfig, Verifiers, check_problems
from opsd.verifiers.code import defines, extract_code, program_for
from opsd.verifiers.sandbox import Limits, isolation, run_program

ROOT = Path(__file__).resolve().parents[1]
HUMANEVAL = ROOT.parent / "shared" / "data" / "humaneval_test.jsonl"
ALLOW = VerifierConfig(allow_code_execution=True, code_timeout_s=3.0)
RUNNER_MARK = b"_result_fd = int(sys.argv[1])"  # in the command line of every sandboxed program

ADD_PROMPT = 'from typing import List\n\n\ndef helper(x):\n    return x\n\n\ndef add(a: int, b: int) -> int:\n    """Sum."""\n'
ADD = Problem("add", ADD_PROMPT, None, "    return a + b\n",
              {"verifier": "code", "entry_point": "add", "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n"})


def runner_processes() -> list[int]:
    """Sandboxed programs still alive anywhere on the machine."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and RUNNER_MARK in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
        except OSError:
            pass
    return found


def processes_with(mark: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and mark.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
        except OSError:
            pass
    return found


# --- extraction and the program -------------------------------------------------------------------

FULL = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("response,expected", [
    (f"Here:\n```python\n{FULL}```\nDone.", FULL),
    (f"```python\n{FULL}```\nUsage:\n```python\nprint(add(1, 2))\n```", FULL),  # the block defining it
    ("```python\nx = 1\n```\n```py\ny = 2\n```", "y = 2\n"),  # none defines it: the last
    (f"```\n{FULL}```", FULL),  # a bare fence
    (f"```python\n{FULL}", FULL),  # an unclosed fence runs to the end
    (f"```javascript\nfunction add() {{}}\n```\n```python\n{FULL}```", FULL),
    ("    return a + b\n", "    return a + b\n"),  # a raw completion of the prompt
    ("    return a + b\n\nif __name__ == '__main__':\n    print(add(1, 2))\n", "    return a + b\n\n"),
    (FULL + "\nprint(add(1, 2))\n", FULL + "\nprint(add(1, 2))\n"),  # a full function is kept whole
    (f"<think>```python\nwrong\n```</think>```python\n{FULL}```", FULL),
    ("", ""),
])
def test_code_extraction(response, expected):
    assert extract_code(response, "add") == expected


def test_program_for_body_and_full_function():
    body = program_for(ADD_PROMPT, "    return a + b\n", "def check(c): pass\n", "add")
    assert body.startswith(ADD_PROMPT + "    return a + b\n") and body.endswith("check(add)\n")
    flush_left = program_for(ADD_PROMPT, "return a + b", "", "add")
    assert ADD_PROMPT + "    return a + b\n" in flush_left
    full = program_for(ADD_PROMPT, FULL, "", "add")
    assert full.count("def add(") == 1 and "def helper(x)" in full and "from typing import List" in full
    for program in (body, flush_left, full):
        compile(program, "program.py", "exec")  # compiled only: model code never runs in this process
    assert defines("async def add(x):\n", "add") and not defines("    def add(x):\n", "add")


# --- grading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("response,correct", [
    ("    return a + b\n", True),
    ("return a + b", True),
    (f"```python\n{FULL}```", True),
    ("```python\ndef add(a, b):\n    return helper(a) + b\n```", True),  # the prompt's helpers stay
    ("    return a - b\n", False),
    ("    import os\n    os._exit(0)\n", False),  # ending early is not passing
    ("    raise SystemExit(0)\n", False),
    ("this is not code", False),
    ("", False),
])
def test_code_verdicts(response, correct):
    with Verifiers(ALLOW) as verifiers:
        verdict, = verifiers.verify([response], [ADD])
    assert verdict.correct is correct and verdict.reward == float(correct)


def humaneval() -> list[Problem]:
    if not HUMANEVAL.is_file():
        pytest.skip(f"{HUMANEVAL} not present")
    problems = load_problems(HUMANEVAL)
    assert len(problems) == 164 and all(p.answer is None for p in problems)
    return problems


def test_humaneval_all_164_canonical_pass_rotated_fail():
    """328 sandboxed programs, two at a time: about 20 s on two busy cores."""
    problems = humaneval()
    config = VerifierConfig(allow_code_execution=True, code_timeout_s=20.0)
    with Verifiers(config) as verifiers:
        canonical = verifiers.verify([p.solution for p in problems], problems)
        rotated = verifiers.verify([problems[(i + 1) % len(problems)].solution for i in range(len(problems))], problems)
        assert verifiers.counters()["sandbox_errors"] == 0
    assert [p.id for p, v in zip(problems, canonical) if not v.correct] == []
    assert [p.id for p, v in zip(problems, rotated) if v.correct] == []


# --- hostile programs -------------------------------------------------------------------------------

# A "trainer": grades one response to a problem whose test passes when f() returns 1, and prints the
# reward. Each payload returns 1 only if its attack worked.
HARNESS = """
import json, sys
from opsd.data import Problem
from opsd.verifiers import VerifierConfig, Verifiers
problem = Problem("p", "def f():\\n    pass\\n", None, None, {"verifier": "code", "entry_point": "f",
                  "tests": "def check(candidate):\\n    assert candidate() == 1\\n"})
with Verifiers(VerifierConfig(allow_code_execution=True, code_timeout_s=2.0)) as verifiers:
    verdict, = verifiers.verify([sys.stdin.read()], [problem])
print(json.dumps({"reward": verdict.reward}))
"""

PAYLOADS = {
    "write outside the temporary directory": """
def f():
    for path in {paths!r}:
        try:
            with open(path, "w") as handle:
                handle.write("escaped")
            return 1
        except OSError:
            pass
    return 0
""",
    "read a secret from the parent's environment": """
def f():
    import os
    secret = {secret!r}
    if any(secret in value for value in os.environ.values()):
        return 1
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{{pid}}/environ", "rb") as handle:
                if secret.encode() in handle.read():
                    return 1
        except OSError:
            pass
    return 0
""",
    "open a socket and connect": """
def f():
    import socket
    try:
        with socket.create_connection(("127.0.0.1", {port}), timeout=1):
            return 1
    except OSError:
        pass
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"escaped", ("127.0.0.1", {udp_port}))
        return 1
    except OSError:
        return 0
""",
    "fork bomb": """
def f():
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
""",
    "allocate 10 GB": """
def f():
    block = bytearray(10 * 1024 ** 3)
    return 1
""",
    "infinite loop": """
def f():
    while True:
        pass
""",
    "kill the parent process": """
def f():
    import os, signal
    targets = {{os.getppid(), {victim}}}
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{{pid}}/cmdline", "rb") as handle:
                if b"OPSD_HARNESS" in handle.read():
                    targets.add(int(pid))
        except (OSError, ValueError):
            pass
    killed = 0
    for pid in targets - {{0, 1, os.getpid()}}:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return 1 if killed else 0
""",
    "a detached child that outlives the timeout": """
def f():
    import os, sys, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", {mark!r}])
        os._exit(0)
    time.sleep(100)
""",
    "print 1 GB": """
def f():
    import sys
    chunk = "x" * (1 << 20)
    for _ in range(1024):
        sys.stdout.write(chunk)
    sys.stdout.flush()
    return 1
""",
    "exit 0 before the tests": """
def f():
    import os
    os._exit(0)
""",
}


@pytest.fixture
def listeners():
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    yield tcp, udp
    tcp.close()
    udp.close()


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_hostile_program_has_no_effect_and_earns_0(name, tmp_path, listeners):
    tcp, udp = listeners
    victim = subprocess.Popen(["sleep", "60"])  # another process of the trainer's user
    mark, secret = f"OPSD-DETACHED-{uuid.uuid4().hex}", f"OPSD-SECRET-{uuid.uuid4().hex}"
    outside = [str(tmp_path / "escaped.txt"), f"/tmp/opsd-escaped-{uuid.uuid4().hex}", f"/dev/shm/opsd-{mark}"]
    payload = PAYLOADS[name].format(paths=outside, secret=secret, port=tcp.getsockname()[1],
                                    udp_port=udp.getsockname()[1], victim=victim.pid, mark=mark)
    started = time.monotonic()
    try:
        trainer = subprocess.run([sys.executable, "-c", HARNESS, "OPSD_HARNESS"], input=payload, text=True,
                                 capture_output=True, timeout=120, cwd=ROOT, env={**os.environ, "OPSD_TEST_SECRET": secret})
        seconds = time.monotonic() - started
        assert trainer.returncode == 0, trainer.stderr[-2000:]  # the trainer survived
        assert json.loads(trainer.stdout.strip().splitlines()[-1]) == {"reward": 0.0}
        assert seconds < 60
        assert not any(Path(path).exists() for path in outside)
        assert victim.poll() is None  # still alive
        with pytest.raises(OSError):
            tcp.accept()
        with pytest.raises(OSError):
            udp.recvfrom(100)
        deadline = time.monotonic() + 2
        while (processes_with(mark) or runner_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(mark) == [] and runner_processes() == []
    finally:
        victim.kill()
        victim.wait()
        for path in outside:
            Path(path).unlink(missing_ok=True)
        for pid in processes_with(mark):
            os.kill(pid, signal.SIGKILL)


def test_output_is_capped_and_the_rest_discarded():
    outcome = run_program("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 100_000)\n",
                          Limits(timeout_s=5, max_output_bytes=1000))
    assert outcome.status == "failed" and outcome.stdout == "x" * 1000 and "BrokenPipeError" in outcome.stderr


def test_environment_is_stripped_and_home_is_the_temporary_directory(monkeypatch):
    monkeypatch.setenv("OPSD_TEST_TOKEN", "secret-token")
    outcome = run_program("import os, json\nprint(json.dumps([dict(os.environ), os.getcwd()]))\n")
    environment, cwd = json.loads(outcome.stdout)
    assert outcome.passed and "OPSD_TEST_TOKEN" not in environment
    assert environment["HOME"] == environment["TMPDIR"] == cwd and Path(cwd).name.startswith("opsd-sandbox-")
    assert not Path(cwd).exists()  # removed afterwards


# --- each layer alone ------------------------------------------------------------------------------

LAYERS = ("namespaces", "landlock", "seccomp")


def only(layer: str) -> tuple[str, ...]:
    return tuple(name for name in LAYERS if name != layer)


def require_layer(layer: str, needs: str) -> None:
    layers = isolation()
    report = {"namespaces": " ".join(layers.get("namespaces", [])) + " " + layers.get("filesystem", ""),
              "landlock": layers.get("landlock", ""), "seccomp": layers.get("seccomp", "")}[layer]
    if needs not in report:
        pytest.skip(f"{layer} does not provide '{needs}' on this machine: {report}")


@pytest.mark.parametrize("layer,needs", [("namespaces", "read-only"), ("landlock", "writes only")])
def test_writes_outside_are_stopped_by_each_layer_alone(layer, needs, tmp_path):
    require_layer(layer, needs)
    target = tmp_path / "escaped.txt"
    outcome = run_program(f"open({str(target)!r}, 'w').write('x')\n", skip_layers=only(layer))
    assert outcome.status == "failed" and not target.exists()
    assert run_program("open('inside.txt', 'w').write('x')\n", skip_layers=only(layer)).passed


@pytest.mark.parametrize("layer,needs", [("namespaces", "net"), ("landlock", "no TCP"), ("seccomp", "sockets")])
def test_connections_are_stopped_by_each_layer_alone(layer, needs, listeners):
    require_layer(layer, needs)
    tcp, _ = listeners
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1)\n"
    assert run_program(program, skip_layers=only(layer)).status == "failed"
    with pytest.raises(OSError):
        tcp.accept()


@pytest.mark.parametrize("layer,needs", [("namespaces", "pid"), ("landlock", "no signals out"), ("seccomp", "kill")])
def test_signals_to_other_processes_are_stopped_by_each_layer_alone(layer, needs):
    require_layer(layer, needs)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        outcome = run_program(f"import os\nos.kill({victim.pid}, 9)\n", skip_layers=only(layer))
        assert outcome.status == "failed" and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_isolation_is_reported():
    layers = isolation()
    assert layers["works"], layers
    assert {"namespaces", "filesystem", "landlock", "seccomp", "limits"} <= set(layers)


# --- never hangs: fuzz ------------------------------------------------------------------------------

SNIPPETS = ["while True: pass", "import time; time.sleep(30)", "x = [0] * 10**10", "def r(): return r()\nr()",
            "import os\ntry:\n    os.fork()\nexcept OSError: pass", "print('y' * 10**7)", "raise SystemExit(0)",
            "import os; os._exit(3)", "input()", "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()",
            "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)", "import ctypes; ctypes.string_at(0)",
            "import os; os.close(1); os.close(2)", "open('big', 'wb').write(b'0' * (64 << 20))", "import os; os.setsid()",
            "a = []\nwhile True: a.append(' ' * 10**6)", "exec('(' * 10**6)", "import os; os.kill(os.getpid(), 9)",
            "return", "\x00", "import sys; sys.stdin.read()", "import gc; gc.collect()", "1/0", "pass",
            "import resource; resource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))"]


def test_fuzzed_programs_never_hang_the_caller():
    rng = random.Random(0)
    responses = ["\n".join(rng.choice(SNIPPETS) for _ in range(rng.randint(1, 3))) for _ in range(24)]
    problems = [ADD] * len(responses)
    config = VerifierConfig(allow_code_execution=True, code_timeout_s=1.0, code_workers=2)
    started = time.monotonic()
    with Verifiers(config) as verifiers:
        verdicts = verifiers.verify([f"```python\ndef add(a, b):\n    return a + b\n{r}\n```" for r in responses], problems)
        assert verifiers.counters()["sandbox_errors"] == 0
    # 24 programs, at most 1 s each plus start-up, two at a time; generous for a busy machine
    assert time.monotonic() - started < 45
    assert len(verdicts) == 24 and runner_processes() == []


# --- the opt-in and the data ------------------------------------------------------------------------


def test_code_rows_are_refused_without_the_opt_in():
    with pytest.raises(UserError, match=r"set verifier\.allow_code_execution=true"):
        check_problems([ADD], "he.jsonl", VerifierConfig())
    with pytest.raises(UserError, match=r"set eval\.verifier\.allow_code_execution=true"):
        check_problems([ADD], "he.jsonl", VerifierConfig(), option="eval.verifier")
    with Verifiers(VerifierConfig()) as verifiers, pytest.raises(UserError, match="allow_code_execution"):
        verifiers.verify(["    return a + b\n"], [ADD])
    check_problems([ADD], "he.jsonl", ALLOW)
    no_tests = Problem("t", "p", None, None, {"verifier": "code", "entry_point": "f"})
    with pytest.raises(UserError, match="'t' .* has no 'tests'"):
        check_problems([no_tests], "he.jsonl", ALLOW)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def code_row(**extra) -> dict:
    return {"id": "add", "problem": ADD_PROMPT, "answer": None, "solution": ADD.solution, **ADD.extra, **extra}


def test_code_rows_load_without_answers_math_rows_do_not(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl", [code_row(), {"id": "m", "problem": "1+1?", "answer": "2"}])
    assert [p.answer for p in load_problems(path)] == [None, "2"]
    missing = write_rows(tmp_path / "missing.jsonl", [code_row(), {"id": "m", "problem": "1+1?", "answer": None}])
    with pytest.raises(UserError, match="missing.jsonl line 2 has no 'answer'"):
        load_problems(missing)
    no_field = write_rows(tmp_path / "nofield.jsonl", [{k: v for k, v in code_row().items() if k != "verifier"}])
    with pytest.raises(UserError, match="line 1 has no 'answer'"):
        load_problems(no_field)
    assert load_problems(no_field, default_verifier="code")[0].answer is None


@pytest.mark.parametrize("command", ["eval", "rlvr", "distill", "pipeline-eval", "pipeline-stage"])
def test_every_command_refuses_code_rows_without_the_opt_in(command, tmp_path, capsys):
    from opsd.cli import main

    data = write_rows(tmp_path / "he.jsonl", [code_row()])
    out = tmp_path / "out"
    if command == "eval":
        responses = write_rows(tmp_path / "r.jsonl", [{"id": "add", "response": "    return a + b\n"}])
        argv, option = ["eval", f"data=[{data}]", f"responses={responses}", f"output_dir={out}"], "verifier"
    elif command in ("rlvr", "distill"):
        config = ROOT / "configs" / ("rlvr-tiny.yaml" if command == "rlvr" else "tiny.yaml")
        argv, option = [command, str(config), f"data.path={data}", f"run.output_dir={out}"], "verifier"
    elif command == "pipeline-eval":
        argv = ["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"eval.data=[{data}]", f"run.output_dir={out}"]
        option = "eval.verifier"
    else:
        stages = [{"name": "rl", "command": "rlvr", "config": str(ROOT / "configs/rlvr-tiny.yaml"),
                   "overrides": [f"data.path={data}"]}]
        config = tmp_path / "pipeline.yaml"
        config.write_text(json.dumps({"stages": stages, "eval": {"data": [str(ROOT / "configs/examples/arithmetic.jsonl")]},
                                      "run": {"output_dir": str(out)}}))
        argv, option = ["pipeline", str(config)], "verifier"
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and f"set {option}.allow_code_execution=true" in message, message
    assert not out.exists()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["```", "```python\n", "def add(", "    return 1\n", "\n", "if __name__", "<think>",
                                 "</think>", "print(", "x" * 1000, " "]), max_size=60).map("".join))
def test_code_extraction_is_total_and_fast(text):
    started = time.perf_counter()
    code = extract_code(text, "add")
    compile_or_fail = program_for(ADD_PROMPT, code, "", "add")
    assert isinstance(compile_or_fail, str) and time.perf_counter() - started < 1.0
