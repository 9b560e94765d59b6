"""Grading one untrusted program in sandboxed processes: the trainer's side.

`run_tests(program, tests, entry_point, limits)` starts `python -I -S -B launcher.py` (beside this
file) in a new session (`start_new_session`: its own session and process group), in a fresh temporary
directory, with an environment holding nothing of the trainer's. The launcher starts two confined
processes (launcher.py's docstring; the walls in walls.py): the candidate runs the program, the judge
runs the tests and calls the candidate's entry point through a proxy, with arguments and results
crossing as plain data (inside.py). The job goes to the judge on stdin; stdout and stderr are kept up
to `max_output_bytes` each (the pipe is closed past it, so a flood ends in a broken pipe), and the
run ends after `timeout_s` of wall clock. Whatever happened, the judge's pid namespace (the candidate's
is inside it) and the whole process group are killed with SIGKILL before the call returns, and the
directory is removed.

The verdict is the judge's: a program passes only when the judge wrote "pass" and its nonce on the
result pipe (which the candidate never holds), the judge then exited normally, and the wall clock
had not run out. `run_program(source)` runs a program with no tests: it passes when it runs to its
end (the candidate says so, so that verdict is not proof against the program itself; it is for
testing the walls, never for grading).

Why a launcher and not `preexec_fn`: the trainer is multi-threaded (torch), and code run between
fork and exec in a copy of a threaded process can deadlock on a lock another thread held; the
launcher makes the same `setrlimit`/`unshare` calls in a fresh single-threaded interpreter,
before any untrusted code runs.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LAUNCHER = Path(__file__).with_name("launcher.py")
STARTUP_GRACE_S = 10.0  # for the launcher's own start on a busy machine, on top of timeout_s
DRAIN_S = 0.5  # output still read after the launcher has ended


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock of the program (CPU time: the next whole second)
    memory_mb: int = 1024  # memory of the program as a whole (cgroup) and of each of its processes (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE); also the size of its private tmpfs
    max_processes: int = 16  # processes and threads it may have at once (pids cgroup, RLIMIT_NPROC)
    max_output_bytes: int = 65536  # stdout and stderr kept, each


@dataclass(frozen=True)
class Outcome:
    status: Literal["passed", "failed", "timeout", "error"]  # error: the sandbox itself failed
    stdout: str
    stderr: str
    seconds: float
    layers: dict[str, Any] = field(default_factory=dict)  # what confined it (launcher.py reports)
    reason: str = ""  # the judge's word: "the tests passed", "the tests failed: AssertionError", "not plain data: ..."
    kind: str = ""  # passed | tests | unsupported (a value could not cross as plain data) | program | timeout | error

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def clean_environment(home: str) -> dict[str, str]:
    """All the program's process gets: nothing of the trainer's variables (tokens, paths)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8"}


def run_program(source: str, limits: Limits = Limits(), *, skip_layers: tuple[str, ...] = ()) -> Outcome:
    """Run `source` as a Python program in the sandbox, with no tests: it passes when it runs to its
    end. For testing the walls; grading uses `run_tests`. `skip_layers` as in `run_tests`."""
    return _run({"program": source, "entry_point": None, "tests": None}, limits, skip_layers)


def run_tests(program: str, tests: str, entry_point: str, limits: Limits = Limits(), *,
              skip_layers: tuple[str, ...] = ()) -> Outcome:
    """Run `program` (the candidate's code) in one sandboxed process and `tests` (which define
    `check(candidate)`) in another, the judge, calling `check` with a proxy of `entry_point`; never
    raises for what the program does. `skip_layers` (tests only: what the others hold alone):
    namespaces, cgroup, uid, landlock, seccomp."""
    return _run({"program": program, "entry_point": entry_point, "tests": tests}, limits, skip_layers)


def _run(job: dict[str, Any], limits: Limits, skip_layers: tuple[str, ...]) -> Outcome:
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="opsd-sandbox-")
    nonce = secrets.token_hex(16)
    status_r, status_w = os.pipe()
    result_r, result_w = os.pipe()
    spec = {"tmp": tmp, "timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
            "max_processes": limits.max_processes, "status_fd": status_w, "result_fd": result_w,
            "parent_pid": os.getpid(), "skip": list(skip_layers)}
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(LAUNCHER), json.dumps(spec)], cwd=tmp,
                                env=clean_environment(tmp), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, pass_fds=(status_w, result_w))
    except OSError as err:
        _close(status_r, result_r)
        _remove(tmp)
        return Outcome("error", "", f"sandbox did not start: {err}", time.monotonic() - started)
    finally:
        _close(status_w, result_w)
    talk = _Exchange(proc, status_r, result_r, json.dumps({**job, "nonce": nonce}).encode(), limits.max_output_bytes)
    try:
        talk.run(deadline=started + limits.timeout_s + STARTUP_GRACE_S)
    finally:
        talk.end()
        _remove(tmp)
    stderr = talk.text("stderr") + (f"\nsandbox: {talk.error}" if talk.error else "")
    verdict, _, reason = bytes(talk.result).decode("utf-8", "replace").partition("\n")
    said, _, kind = verdict.rpartition(" ")  # "pass NONCE passed", "fail NONCE tests"
    status = _status(talk, said == f"pass {nonce}")
    reason = {"timeout": "the time limit ran out", "error": f"the sandbox failed: {talk.error}"}.get(status, reason)
    kind = kind if said in (f"pass {nonce}", f"fail {nonce}") and status in ("passed", "failed") else status
    return Outcome(status, talk.text("stdout"), stderr, time.monotonic() - started, talk.layers,
                   reason or "the judge gave no verdict", kind)


def _status(talk: _Exchange, judged_pass: bool) -> Literal["passed", "failed", "timeout", "error"]:
    """A pass needs all three: the judge's pass with the nonce, the judge's normal exit, no timeout."""
    if talk.timed_out:
        return "timeout"
    if talk.error:
        return "error"
    return "passed" if judged_pass and talk.exit_code == 0 else "failed"


class _Exchange:
    """The parent's half of one run: read the status, stdout, stderr and result pipes, send the
    program once the program's process is known (and held by a pidfd), and kill everything at
    the end. One selector loop, no threads."""

    def __init__(self, proc: subprocess.Popen, status_fd: int, result_fd: int, payload: bytes, cap: int):
        self.proc, self.payload, self.cap = proc, payload, cap
        self.buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
                        status_fd: bytearray(), result_fd: bytearray()}
        self.names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        self.status_fd, self.result = status_fd, self.buffers[result_fd]
        self.owned = [status_fd, result_fd]
        self.pidfd: int | None = None
        self.child_pid: int | None = None
        self.layers: dict[str, Any] = {}
        self.timed_out, self.error, self.ended = False, "", False
        self.exit_code: int | None = None  # the judge's, as the launcher reports it
        self.selector = selectors.DefaultSelector()
        for fd in self.buffers:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ)

    def run(self, deadline: float) -> None:
        drain_until = None
        while self.selector.get_map():
            now = time.monotonic()
            limit = deadline if drain_until is None else min(deadline, drain_until)
            if now >= limit:
                self.timed_out = self.timed_out or drain_until is None
                return
            for key, _ in self.selector.select(timeout=min(0.05, limit - now)):
                if key.events & selectors.EVENT_WRITE:
                    self._send(key.fd)
                else:
                    self._read(key.fd)
            if drain_until is None and (self.ended or self._launcher_gone()):
                drain_until = time.monotonic() + DRAIN_S

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.selector.unregister(fd)
            return
        buffer = self.buffers[fd]
        room = self.cap - len(buffer) if fd in self.names else 4096 - len(buffer)
        buffer += chunk[: max(room, 0)]
        if fd in self.names and len(buffer) >= self.cap:
            self.selector.unregister(fd)  # past the cap: close our end, the program's writes fail
            self._close_stream(fd)
        elif fd == self.status_fd:
            self._status_lines()

    def _close_stream(self, fd: int) -> None:
        stream = self.proc.stdout if self.names[fd] == "stdout" else self.proc.stderr
        stream.close()

    def _status_lines(self) -> None:
        buffer = self.buffers[self.status_fd]
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            kind, _, value = line.decode("utf-8", "replace").partition(" ")
            if kind == "pid":
                self._hold(int(value))
            elif kind == "layers":
                self.layers = json.loads(value)
            elif kind == "timeout":
                self.timed_out, self.ended = True, True
            elif kind == "exit":
                self.ended, self.exit_code = True, int(value)
            elif kind == "error":
                self.error, self.ended = value, True

    def _hold(self, pid: int) -> None:
        """Keep a pidfd on the judge (pid 1 of its namespace, the candidate's inside it) before sending
        the job: killing it later can never hit a recycled pid."""
        self.child_pid = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        stdin = self.proc.stdin.fileno()
        os.set_blocking(stdin, False)
        self.selector.register(stdin, selectors.EVENT_WRITE)

    def _send(self, fd: int) -> None:
        try:
            sent = os.write(fd, self.payload[:65536])
        except BlockingIOError:
            return
        except OSError:  # the program's process is gone
            sent = len(self.payload)
        self.payload = self.payload[sent:]
        if not self.payload:
            self.selector.unregister(fd)
            self.proc.stdin.close()

    def _launcher_gone(self) -> bool:
        """Whether the launcher has exited; it stays a zombie (unreaped) so its pid, the process
        group's id, cannot be reused before `end` kills the group."""
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def end(self) -> None:
        """SIGKILL the judge's pid namespace (through the pidfd) and the whole process group,
        then reap the launcher and close every pipe."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
            os.close(self.pidfd)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        self.selector.close()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if not stream.closed:
                stream.close()
        _close(*self.owned)

    def text(self, name: str) -> str:
        fd = next(fd for fd, n in self.names.items() if n == name)
        return self.buffers[fd].decode("utf-8", "replace")


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _remove(path: str) -> None:
    """Remove the temporary directory, whatever modes the program left on its entries."""
    def retry(function: Any, failed: str, _: Any) -> None:
        os.chmod(os.path.dirname(failed), stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IRWXU)
        function(failed)

    try:
        shutil.rmtree(path, onerror=retry)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


_LAYERS: dict[str, Any] | None = None
_LAYERS_LOCK = threading.Lock()


def isolation() -> dict[str, Any]:
    """What confines a program on this machine (measured once, by running an empty one)."""
    global _LAYERS
    with _LAYERS_LOCK:
        if _LAYERS is None:
            outcome = run_program("pass\n")
            _LAYERS = dict(outcome.layers, works=outcome.passed, problem=outcome.stderr[-300:])
        return _LAYERS


def describe(layers: dict[str, Any]) -> str:
    """One line for the log: each wall and what it gave."""
    if not layers.get("works"):
        return f"the sandbox does not run programs here: {layers.get('problem', '').strip()}"
    program = layers.get("program", {})
    spaces = ", ".join(layers.get("namespaces", [])) or "none (no network or pid isolation)"
    return (f"namespaces: {spaces}; view: {layers.get('view')}; /proc: {program.get('proc')}; "
            f"cgroup: {layers.get('cgroup')}; user: {program.get('uid')}; landlock: {program.get('landlock')}; "
            f"seccomp: {program.get('seccomp')}; limits: {program.get('limits')}; "
            f"tests run by a judge process ({layers.get('judge', {}).get('uid')})")
