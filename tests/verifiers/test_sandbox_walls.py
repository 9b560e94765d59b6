"""The code sandbox's walls: hostile programs whose effects must not happen (each run by a separate "trainer"
process that must survive, reward 0), docs/sandbox.md's threat table checked row by row with each wall alone, the
same attacks working where their walls are taken away (so that each test measures its wall), a run as an
ordinary user, and a fuzz bound."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from opsd.core.data import Problem
from opsd.verifiers import VerifierConfig, Verifiers
from opsd.verifiers.sandbox import Limits, isolation, run_program

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = ROOT / "opsd" / "verifiers" / "sandbox" / "__init__.py"
LAYERS = ("namespaces", "cgroup", "uid", "landlock", "seccomp")
RUNNER_MARK = b"launcher.py"  # in the command line of every sandbox launcher
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every uid: what a uid of its own needs without the view
ADD_PROMPT = 'def add(a: int, b: int) -> int:\n    """Sum."""\n'
ADD = Problem("add", ADD_PROMPT, None, "    return a + b\n",
              {"verifier": "code", "entry_point": "add", "tests": "def check(candidate):\n    assert candidate(2, 3) "
                                                                  "== 5\n"})


def processes_with(mark: bytes) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and mark in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
        except OSError:
            pass
    return found


# --- hostile programs, through the grader ------------------------------------------------------------

# A "trainer": grades one response to a problem whose test passes when f() returns 1, and prints the
# reward. Each payload returns 1 only if its attack worked.
HARNESS = """
import json, sys
from opsd.core.data import Problem
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
    "read files the grader's user can read": """
def f():
    for path in {readable!r}:
        try:
            with open(path, "rb") as handle:
                if handle.read(64):
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
    "connect over TCP": """
def f():
    import socket
    try:
        with socket.create_connection(("127.0.0.1", {port}), timeout=1):
            return 1
    except OSError:
        return 0
""",
    "send a UDP datagram": """
def f():
    import socket
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"escaped", ("127.0.0.1", {udp_port}))
        return 1
    except OSError:
        return 0
""",
    "send to a unix socket on the host": """
def f():
    import socket
    for address in ({unix_path!r}, {unix_abstract!r}):
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(address)
                client.sendall(b"escaped")
                return 1
        except OSError:
            pass
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
    "3000 threads": """
def f():
    import threading
    gate, started = threading.Event(), 0
    try:
        for _ in range(3000):
            threading.Thread(target=gate.wait, daemon=True).start()
            started += 1
    except RuntimeError:
        pass
    gate.set()
    return 1 if started > 16 else 0
""",
    "allocate 10 GB": """
def f():
    block = bytearray(10 * 1024 ** 3)
    return 1
""",
    "hold memory outside the address space (shared memory, memfd)": """
def f():
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    held = 0
    for _ in range(4):
        segment = libc.shmget(0, ctypes.c_size_t(400 << 20), 0o1600)
        address = libc.shmat(segment, None, 0) if segment >= 0 else -1
        if address in (None, -1, ctypes.c_void_p(-1).value):
            break
        ctypes.memset(address, 1, 400 << 20)
        libc.shmdt(ctypes.c_void_p(address))
        held += 400
    chunk = b"x" * (1 << 20)
    try:
        for index in range(1400):
            if index % 15 == 0:
                fd = os.memfd_create("x")
            os.write(fd, chunk)
            held += 1
    except OSError:
        pass
    return 1 if held > 1200 else 0
""",
    "memory across processes": """
def f():
    import os
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            block = bytearray(600 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            os._exit(0)
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    return 1 if codes == [0, 0, 0, 0] else 0
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
    "signal another process through F_SETOWN": """
def f():
    import fcntl, os
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(read_end, fcntl.F_SETOWN, {victim})
        fcntl.fcntl(read_end, 10, 9)  # F_SETSIG: SIGKILL
        fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_ASYNC)
        os.write(write_end, b"x")
        return 1
    except OSError:
        return 0
""",
    "ptrace or read the memory of another process": """
def f():
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in ({victim}, os.getppid()):
        if pid > 1 and libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
            return 1
        try:
            with open(f"/proc/{{pid}}/mem", "rb") as handle:
                handle.read(1)
                return 1
        except (OSError, ValueError):
            pass
    return 0
""",
    "open devices (kvm, userfaultfd, the disk)": """
def f():
    import os
    for path in ("/dev/kvm", "/dev/userfaultfd", "/dev/vda", "/dev/sda", "/dev/mem", "/dev/tty", "/dev/kmsg"):
        try:
            os.close(os.open(path, os.O_RDWR))
            return 1
        except OSError:
            pass
    return 0
""",
    "a user namespace through clone": """
def f():
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    number = {{"x86_64": 56, "aarch64": 220}}[os.uname().machine]
    pid = libc.syscall(number, 0x10000000 | 17, 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
        return 1
    return 0
""",
    "write /proc/sys (the hostname)": """
def f():
    try:
        with open("/proc/sys/kernel/hostname", "w") as handle:
            handle.write("opsd-escaped")
        return 1
    except OSError:
        return 0
""",
    "change a host file's contents, mode and times": """
def f():
    import os
    try:
        with open({target!r}, "a") as handle:
            handle.write("escaped")
        return 1
    except OSError:
        pass
    try:
        os.chmod({target!r}, 0o777)
        return 1
    except OSError:
        pass
    try:
        os.utime({target!r}, (0, 0))
        return 1
    except OSError:
        return 0
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


def shm_segments() -> set[str]:
    """The ids of the host's SysV shared memory segments."""
    try:
        lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {line.split()[1] for line in lines if line.strip()}


class Host:
    """What the hostile programs aim at, set up by the test: listeners, a victim process, files."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        tmp_path.chmod(0o755)
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen()
        self.tcp.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.unix_path = str(tmp_path / "host.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.unix_abstract = f"\0opsd-test-{uuid.uuid4().hex}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.unix_abstract)
        for listener in (self.unix, self.abstract):
            listener.listen()
            listener.setblocking(False)
        self.mark, self.secret = f"OPSD-DETACHED-{uuid.uuid4().hex}", f"OPSD-SECRET-{uuid.uuid4().hex}"
        self.victim = self.start_victim()
        self.outside = [str(tmp_path / "escaped.txt"), f"/tmp/opsd-escaped-{uuid.uuid4().hex}",
                        f"/dev/shm/opsd-{self.mark}"]
        self.target = tmp_path / "host-file.txt"
        self.target.write_text("host")
        self.target.chmod(0o644)
        self.secret_file = tmp_path / "answers.jsonl"
        self.secret_file.write_text(self.secret)
        self.secret_file.chmod(0o644)
        self.hostname = socket.gethostname()
        self.segments = shm_segments()

    def start_victim(self) -> subprocess.Popen:
        """Another process of the trainer's user, with the secret in its environment; as root, without
        capabilities, so that only the sandbox's walls (not the program's own lack of them) protect it."""
        drop = ["setpriv", "--bounding-set=-all",
                "--inh-caps=-all"] if os.geteuid() == 0 and shutil.which("setpriv") else []
        return subprocess.Popen([*drop, "sleep", "60"], env={**os.environ, "OPSD_TEST_SECRET": self.secret})

    def readable(self) -> list[str]:
        data = ROOT.parent / "shared" / "data" / "humaneval_test.jsonl"
        return [str(self.secret_file), "/etc/shadow", "/etc/passwd", str(data), str(ROOT / "README.md"),
                str(Path.home() / ".bashrc"), str(ROOT / "opsd" / "__init__.py")]

    def payload(self, name: str) -> str:
        return PAYLOADS[name].format(
            paths=self.outside, secret=self.secret, port=self.tcp.getsockname()[1], udp_port=self.udp.getsockname()[1],
            victim=self.victim.pid, mark=self.mark, readable=self.readable(), unix_path=self.unix_path,
            unix_abstract=self.unix_abstract, target=str(self.target))

    def untouched(self) -> None:
        """Every effect the payloads aim at did not happen."""
        assert not any(Path(path).exists() for path in self.outside)
        assert self.victim.poll() is None  # still alive
        for listener in (self.tcp, self.unix, self.abstract):
            with pytest.raises(OSError):
                listener.accept()
        with pytest.raises(OSError):
            self.udp.recvfrom(100)
        assert stat.S_IMODE(self.target.stat().st_mode) == 0o644 and self.target.stat().st_mtime > 0
        assert self.target.read_text() == "host"
        assert socket.gethostname() == self.hostname

    def close(self) -> None:
        # a wall tested alone without the IPC namespace (cgroup, seccomp) lets shmget run in the host's: the
        # OOM-killed program's segments outlive it there, so the test removes what it made
        for segment in shm_segments() - self.segments:
            subprocess.run(["ipcrm", "-m", segment], capture_output=True)
        self.victim.kill()
        self.victim.wait()
        for listener in (self.tcp, self.udp, self.unix, self.abstract):
            listener.close()
        for path in self.outside:
            Path(path).unlink(missing_ok=True)
        for pid in processes_with(self.mark.encode()):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def host(tmp_path):
    target = Host(tmp_path)
    yield target
    target.close()


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_hostile_program_has_no_effect_and_earns_0(name, host):
    started = time.monotonic()
    trainer = subprocess.run([sys.executable, "-c", HARNESS, "OPSD_HARNESS"], input=host.payload(name), text=True,
                             capture_output=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "OPSD_TEST_SECRET": host.secret})
    seconds = time.monotonic() - started
    assert trainer.returncode == 0, trainer.stderr[-2000:]  # the trainer survived
    assert json.loads(trainer.stdout.strip().splitlines()[-1]) == {"reward": 0.0}, trainer.stderr[-2000:]
    assert seconds < 60
    host.untouched()
    deadline = time.monotonic() + 2
    while (processes_with(host.mark.encode()) or processes_with(RUNNER_MARK)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(host.mark.encode()) == [] and processes_with(RUNNER_MARK) == []


# --- the threat table, row by row: each wall alone ----------------------------------------------------

# (threat, its payload, the walls docs/sandbox.md's table says stop it alone). Each payload is called as
# a program: it runs to its end (the sandbox's "passed") only when its attack worked.
TABLE = [
    ("reads outside the view", "read files the grader's user can read", ("namespaces", "landlock")),
    ("writes outside the temporary directory", "write outside the temporary directory", ("namespaces", "landlock")),
    ("a host file's contents, mode and times", "change a host file's contents, mode and times", ("namespaces", "uid")),
    ("TCP", "connect over TCP", ("namespaces", "landlock", "seccomp")),
    ("UDP", "send a UDP datagram", ("namespaces", "seccomp")),
    ("unix sockets on the host", "send to a unix socket on the host", ("namespaces", "seccomp")),
    ("signals to other processes", "kill the parent process", ("namespaces", "landlock", "seccomp", "uid")),
    ("signals through F_SETOWN", "signal another process through F_SETOWN", ("namespaces", "landlock", "seccomp",
                                                                             "uid")),
    ("ptrace and others' memory", "ptrace or read the memory of another process", ("namespaces", "landlock", "seccomp",
                                                                                   "uid")),
    ("the trainer's environment", "read a secret from the parent's environment", ("namespaces", "landlock", "uid")),
    ("memory outside the address space", "hold memory outside the address space (shared memory, memfd)",
     ("cgroup", "seccomp")),
    ("memory across processes", "memory across processes", ("cgroup",)),
    ("threads", "3000 threads", ("cgroup", "uid", "seccomp")),
    ("devices", "open devices (kvm, userfaultfd, the disk)", ("namespaces", "landlock")),
    ("user namespaces", "a user namespace through clone", ("seccomp",)),
    ("/proc/sys", "write /proc/sys (the hostname)", ("namespaces", "landlock", "uid")),
]
CASES = [(threat, name, wall) for threat, name, walls in TABLE for wall in walls]

# run by a trainer with a Python any uid can read, for the uid wall (the development machine's own
# Python lies under /root, which no uid of its own may enter without the view)
ALONE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("opsd_sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["opsd_sandbox"] = sandbox
spec.loader.exec_module(sandbox)
outcome = sandbox.run_program(sys.stdin.read() + "\\nassert f() == 1\\n", skip_layers=tuple(sys.argv[2:]))
print(json.dumps({"status": outcome.status, "uid": outcome.layers.get("program", {}).get("uid", "")}))
"""


def run_with(payload: str, skip: tuple[str, ...], through_system_python: bool = False) -> str:
    if not through_system_python:
        outcome = run_program(payload + "\nassert f() == 1\n", skip_layers=skip)
        return outcome.status
    done = subprocess.run([SYSTEM_PYTHON, "-I", "-c", ALONE, str(SANDBOX), *skip], input=payload, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert "its own" in result["uid"], result  # the wall under test held
    return result["status"]


def require(wall: str) -> None:
    layers = isolation()
    program = layers.get("program", {})
    held = {"namespaces": layers.get("view", "").startswith("only") and "pid" in layers.get("namespaces", []),
            "cgroup": "memory+pids" in layers.get("cgroup", ""), "landlock": "ABI" in program.get("landlock", ""),
            "seccomp": "refused" in program.get("seccomp", ""), "uid": os.geteuid() == 0}[wall]
    if not held:
        pytest.skip(f"the {wall} wall does not hold on this machine: {layers}")
    if wall == "uid" and not (os.path.exists(SYSTEM_PYTHON) and os.stat(SYSTEM_PYTHON).st_mode & 0o005 == 0o005):
        pytest.skip(f"no Python readable by every uid at {SYSTEM_PYTHON}")


def attack_worked(host: Host, name: str, status: str) -> bool:
    """The program ran to its end, or (signals, whose sending succeeds before the kernel checks who may
    receive them) the victim is dead."""
    if "F_SETOWN" in name or "kill" in name:
        time.sleep(0.2)
        return host.victim.poll() is not None
    return status == "passed"


@pytest.mark.parametrize("threat,name,wall", CASES, ids=[f"{t}-{w}" for t, _, w in CASES])
def test_each_wall_alone_stops_its_threats(threat, name, wall, host):
    require(wall)
    skip = tuple(layer for layer in LAYERS if layer != wall)
    status = run_with(host.payload(name), skip, through_system_python=wall == "uid")
    assert not attack_worked(host, name, status), (threat, wall)
    host.untouched()


# attacks whose effect on this machine is harmless or undone by the test (not the hostname)
CONTROLS = [name for _, name, _ in TABLE if "hostname" not in name]


@pytest.mark.parametrize("name", CONTROLS)
def test_each_attack_works_where_its_walls_are_taken_away(name, host):
    """Without the walls its table row names, the attack succeeds: so the row's tests measure those walls.
    (Without the view, this machine's Python under /root leaves no uid of its own: the program is uid 0
    without capabilities, which the victim, also without capabilities, does not outrank.)"""
    walls = next(walls for _, payload, walls in TABLE if payload == name)
    assert attack_worked(host, name, run_with(host.payload(name), tuple(walls))), name


# --- what every run gets ------------------------------------------------------------------------------------


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


def test_the_program_sees_the_standard_library_and_nothing_else():
    program = ("import os, sys, json, decimal, fractions, hashlib, heapq, itertools, re, string, collections\n"
               "def link(fd):\n    try:\n        return os.readlink(f'/proc/self/fd/{fd}')\n    except OSError:\n"
               "        return '/proc/'  # the listing's own folder, closed by now\n"
               "fds = [link(fd) for fd in os.listdir('/proc/self/fd')]\n"
               "print(json.dumps([[t if not t.startswith('/proc/') else '/proc/' for t in fds], sys.path]))\n"
               "import importlib.util\nassert importlib.util.find_spec('torch') is None\n"
               "assert importlib.util.find_spec('opsd') is None\n")
    outcome = run_program(program)
    assert outcome.passed, outcome.stderr
    fds, path = json.loads(outcome.stdout)
    # stdin (/dev/null), stdout and stderr, the two pipes to the judge, and the listing's own folder
    assert sorted(target.split("[")[0] for target in fds) == ["/dev/null", "/proc/", "pipe:", "pipe:", "pipe:", "pipe:"]
    assert not any("site-packages" in entry for entry in path)


def test_isolation_is_reported():
    layers = isolation()
    assert layers["works"], layers
    assert {"namespaces", "view", "cgroup", "program", "judge"} <= set(layers)
    assert {"proc", "uid", "limits", "landlock", "seccomp"} <= set(layers["program"])


def test_an_ordinary_user_gets_a_user_namespace_and_the_same_verdicts(tmp_path):
    """As uid 1000 (no cgroup, no uid switch): the user namespace, the view, Landlock and seccomp; a right
    program passes, a wrong one fails, a fork bomb stops at the process limit, reads and writes are confined."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs root (to become uid 1000), setpriv and a Python every uid can read")
    tmp_path.chmod(0o755)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    secret.chmod(0o644)
    # the sandbox's files where uid 1000 can read them, whatever the checkout's folder allows (a mode-700 clone)
    readable = Path(tempfile.mkdtemp(prefix="opsd-sandbox-code-"))
    readable.chmod(0o755)
    for source in SANDBOX.parent.glob("*.py"):
        shutil.copy(source, readable / source.name)
        (readable / source.name).chmod(0o644)
    script = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("opsd_sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["opsd_sandbox"] = sandbox
spec.loader.exec_module(sandbox)
tests = "def check(candidate):\\n    assert candidate(2, 3) == 5\\n"
right = sandbox.run_tests("def add(a, b):\\n    return a + b\\n", tests, "add")
wrong = sandbox.run_tests("def add(a, b):\\n    return a - b\\n", tests, "add")
bomb = sandbox.run_program("import os\\nn = 0\\nwhile n < 100:\\n    try:\\n        if os.fork() == 0:\\n"
                           "            import time; time.sleep(5)\\n        n += 1\\n"
                           "    except OSError:\\n        break\\nassert n > 20, n\\n")
read = sandbox.run_program(f"open({sys.argv[2]!r}).read()")
write = sandbox.run_program(f"open({sys.argv[2]!r}, 'w').write('x')")
print(json.dumps({"right": right.status, "wrong": wrong.status, "bomb": bomb.status, "read": read.status,
                  "write": write.status, "layers": right.layers}))
"""
    done = subprocess.run([setpriv, "--reuid=1000", "--regid=1000", "--clear-groups", SYSTEM_PYTHON, "-I", "-c", script,
                           str(readable / SANDBOX.name), str(secret)], capture_output=True, text=True, timeout=120,
                          cwd="/tmp")
    shutil.rmtree(readable)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    if "user" not in result["layers"].get("namespaces", []):
        pytest.skip(f"no user namespaces for ordinary users here: {result['layers']}")
    assert (result["right"], result["wrong"], result["bomb"], result["read"], result["write"]) == \
        ("passed", "failed", "failed", "failed", "failed"), result
    assert secret.read_text() == "secret"


# --- never hangs: fuzz ------------------------------------------------------------------------------

SNIPPETS = ["while True: pass", "import time; time.sleep(30)", "x = [0] * 10**10", "def r(): return r()\nr()",
            "import os\ntry:\n    os.fork()\nexcept OSError: pass", "print('y' * 10**7)", "raise SystemExit(0)",
            "import os; os._exit(3)", "input()", "import threading, time\nthreading.Thread(target=time.sleep, "
                                                 "args=(60,)).start()",
            "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)", "import ctypes; ctypes.string_at(0)",
            "import os; os.close(1); os.close(2)", "open('big', 'wb').write(b'0' * (64 << 20))",
            "import os; os.setsid()",
            "a = []\nwhile True: a.append(' ' * 10**6)", "exec('(' * 10**6)", "import os; os.kill(os.getpid(), 9)",
            "return", "\x00", "import sys; sys.stdin.read()", "import gc; gc.collect()", "1/0", "pass",
            "import resource; resource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))",
            "import os; [os.close(fd) for fd in range(3, 64) if fd != 1]", "import os; os.write(4, b'\\xff' * 100)"]


def test_fuzzed_programs_never_hang_the_caller():
    rng = random.Random(0)
    responses = ["\n".join(rng.choice(SNIPPETS) for _ in range(rng.randint(1, 3))) for _ in range(24)]
    problems = [ADD] * len(responses)
    config = VerifierConfig(allow_code_execution=True, code_timeout_s=1.0, code_workers=2)
    started = time.monotonic()
    with Verifiers(config) as verifiers:
        verdicts = verifiers.verify([f"```python\ndef add(a, b):\n    return a + b\n{r}\n```" for r in responses],
                                    problems)
        assert verifiers.counters()["sandbox_errors"] == 0
    # 24 programs, at most 1 s each plus start-up, two at a time; generous for a busy machine
    assert time.monotonic() - started < 45
    assert len(verdicts) == 24 and processes_with(RUNNER_MARK) == []


# --- the seccomp filter, read by a small BPF interpreter ------------------------------------------------


def bpf_verdict(program: list[tuple[int, int, int, int]], arch: int, number: int, *args: int) -> int:
    """What the filter returns for one system call (the classic-BPF subset the filter uses)."""
    data = {0: number, 4: arch, **{16 + 8 * i: value & 0xFFFFFFFF for i, value in enumerate(args)}}
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # load a word of seccomp_data
            accumulator, pc = data.get(k, 0), pc + 1
        elif code == 0x06:
            return k
        else:
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: bool(accumulator & k)}[code]
            pc += 1 + (jt if taken else jf)


def test_the_seccomp_filter_refuses_and_allows_what_it_says():
    from opsd.verifiers.sandbox.filters import _SYSCALLS, seccomp_program

    arch, _, numbers = _SYSCALLS["x86_64"]
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000
    new_user, thread, sigchld = 0x10000000, 0x00010000 | 0x00000100 | 0x00000800, 17
    for tasks in ("any", "none"):
        program = seccomp_program("x86_64", tasks)
        verdict = lambda number, *args: bpf_verdict(program, arch, number, *args)
        assert verdict(0) == allow and verdict(1) == allow  # read, write
        assert verdict(numbers["socket"], 1) == eperm and verdict(numbers["socket"], 2) == eperm
        assert verdict(numbers["clone"], new_user | sigchld) == eperm  # a user namespace: never
        assert verdict(435) == enosys  # clone3: the C library falls back to clone
        # F_SETOWN, F_GETFL
        assert verdict(numbers["fcntl"], 3, 8) == eperm and verdict(numbers["fcntl"], 3, 3) == allow
        # TIOCSTI, FIONREAD
        assert verdict(numbers["ioctl"], 3, 0x5412) == eperm and verdict(numbers["ioctl"], 3, 0x541B) == allow
        # F_SETLK, F_OFD_SETLK
        assert verdict(numbers["fcntl"], 3, 6) == eperm and verdict(numbers["fcntl"], 3, 37) == eperm
        for name in ("kill", "ptrace", "shmget", "memfd_create", "unshare", "mount", "bpf", "userfaultfd",
                     "inotify_init1",
                     "flock", "fadvise64"):
            assert verdict(numbers[name]) == eperm, name
        assert verdict(0x40000000 + 1) == eperm  # the x32 ABI
        assert bpf_verdict(program, 0x40000003, 1) == kill  # another architecture's calls (i386)
        expected = {"any": (allow, allow, allow), "none": (eperm, eperm, eperm)}[tasks]
        assert (verdict(numbers["clone"], sigchld), verdict(numbers["clone"], thread),
                verdict(numbers["fork"])) == expected
