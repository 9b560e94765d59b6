"""The sandbox's child side: confine a fresh process, then run one untrusted program in it.

Run by opsd/verifiers/sandbox.py as `python -I -S confine.py SPEC` in a new session, with a
stripped environment and a fresh temporary directory as working directory. Standard library
only, and never imported by the trainer for anything but its path. Everything here happens
before any untrusted code runs; each layer is tried, and what held is reported to the parent
(a `layers` line on the status pipe), so the sandbox says where it is weaker than intended.

The launcher (this process, trusted):
  1. dies with the trainer (PR_SET_PDEATHSIG) and adopts orphans (PR_SET_CHILD_SUBREAPER);
  2. enters new pid, mount, network and IPC namespaces: directly when root, else inside a new
     user namespace (uid mapped to 1000 inside, so `execve` drops every capability);
  3. in the mount namespace: makes every mount read-only and mounts a size-limited tmpfs on
     the temporary directory (the only writable place);
  4. forks the program's process (pid 1 of the new pid namespace: when it exits, the kernel
     kills every process left in the namespace, detached or not), reports its pid, waits at
     most `timeout_s`, then kills it and every descendant and reports how it ended.
The program's process, before `execve` of the runner:
  mounts a fresh /proc (only the namespace's processes are visible); when root, becomes
  `nobody` (65534), or, where nobody cannot read the Python install, drops every capability;
  sets the resource limits; sets no_new_privs; restricts writes to the
  temporary directory and /dev/null, TCP and signals outside itself with Landlock; installs a
  seccomp filter denying kill/ptrace/sockets other than AF_UNIX/mount/unshare/io_uring/bpf.
The runner reads `nonce\\nprogram` from stdin, runs the program, and only when it returns
writes the nonce to the result pipe: exiting early (`os._exit(0)`) is not a pass.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import struct
import sys
import time

NOBODY = 65534
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, PR_SET_SECCOMP = 1, 38, 36, 22
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 28, 47, 4
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD, SYS_LANDLOCK_RESTRICT = 442, 444, 445, 446
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1

RUNNER = """
import os, sys
_result_fd = int(sys.argv[1])
_nonce, _, _source = sys.stdin.buffer.read().partition(b"\\n")
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.argv = ["program.py"]
exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.flush()
    except Exception:
        pass
os.write(_result_fd, _nonce)
os._exit(0)
"""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# --- the launcher -----------------------------------------------------------------------------


def enter_namespaces(root: bool) -> list[str]:
    """New pid/mount/net/IPC namespaces (root: directly; others: in a new user namespace);
    only user+net, or nothing, where the machine refuses more. The names that were entered."""
    uid, gid = os.geteuid(), os.getegid()
    full = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
    attempts = [(full, ["pid", "mount", "net", "ipc"])] if root else []
    attempts += [(CLONE_NEWUSER | full, ["user", "pid", "mount", "net", "ipc"]),
                 (CLONE_NEWUSER | CLONE_NEWNET, ["user", "net"])]
    for flags, names in attempts:
        if _libc.unshare(ctypes.c_int(flags)) == 0:
            if flags & CLONE_NEWUSER:  # inside uid 1000, not 0: execve then drops all capabilities
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"1000 {uid} 1")
                _write("/proc/self/gid_map", f"1000 {gid} 1")
            return names
    return []


def _mount_setattr(path: str, flags: int, attr_set: int, attr_clr: int) -> None:
    attr = struct.pack("QQQQ", attr_set, attr_clr, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, attr, len(attr)), f"mount_setattr {path}")


def private_filesystem(tmp: str, tmp_mb: int, owner: int | None) -> str:
    """Every mount read-only but a fresh tmpfs of `tmp_mb` MiB on `tmp` (in our mount namespace)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back out
    owner_opts = f",uid={owner},gid={owner}" if owner is not None else ""
    _mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=0700{owner_opts}")
    try:
        _mount_setattr("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)
        _mount_setattr(tmp, 0, 0, MOUNT_ATTR_RDONLY)
    except OSError as err:
        return f"private tmpfs; root not read-only ({err.strerror})"
    return "read-only except a private tmpfs"


def _children_of(pid: int) -> list[int]:
    """Direct children, from /proc (used only without a pid namespace)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


def sweep(child: int, pid_namespace: bool, give_up_s: float = 3.0) -> None:
    """Kill `child` and, without a pid namespace, every process reparented to us (we are a
    subreaper), until none is left. With one, killing `child` (its pid 1) ends all of it."""
    end = time.monotonic() + give_up_s
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while time.monotonic() < end:
        if not pid_namespace:
            for pid in _children_of(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.002)


def wait_for(child: int, timeout_s: float) -> int | None:
    """The child's wait status, or None when `timeout_s` passed first (orphans are reaped too)."""
    deadline, delay = time.monotonic() + timeout_s, 0.0005
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == child:
            return status
        if pid == 0:
            if time.monotonic() >= deadline:
                return None
            time.sleep(delay)
            delay = min(2 * delay, 0.01)


def main() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    try:
        who, layers = confine_launcher(spec)
        launcher = os.getpid()
        child = os.fork()
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which grades 0
        os.write(status_fd, f"error {type(err).__name__}: {err}\n".encode())
        os._exit(70)
    if child == 0:
        program_process(spec, layers, who, launcher)
    os.close(0)
    os.write(status_fd, f"pid {child}\n".encode())
    status = wait_for(child, spec["timeout_s"])
    sweep(child, "pid" in layers["namespaces"])
    os.write(status_fd, b"timeout\n" if status is None else f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def confine_launcher(spec: dict) -> tuple[str, dict[str, object]]:
    """Steps 1-3 of the module docstring. Returns who the program will run as ("nobody": root
    will switch to it; "uid0": it keeps the kernel's uid 0, without capabilities; "user": the
    ordinary user opsd runs as) and the layers entered so far."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spec["parent_pid"]:
        os._exit(1)  # the trainer is already gone
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    root = os.geteuid() == 0
    namespaces = [] if "namespaces" in spec["skip"] else enter_namespaces(root)
    # inside a user namespace only our own uid is mapped: no switch to nobody there
    as_nobody = root and "user" not in namespaces and "drop_root" not in spec["skip"] and nobody_can_run_python()
    filesystem = "shared"
    if "mount" in namespaces:
        try:
            filesystem = private_filesystem(spec["tmp"], spec["file_mb"], NOBODY if as_nobody else None)
        except OSError as err:
            filesystem = f"shared ({err.strerror})"
    if as_nobody and filesystem.startswith("shared"):
        os.chown(spec["tmp"], NOBODY, NOBODY)
    who = "nobody" if as_nobody else "uid0" if root else "user"
    return who, {"namespaces": namespaces, "filesystem": filesystem}


# --- the program's process ----------------------------------------------------------------------


def program_process(spec: dict, layers: dict, who: str, launcher: int) -> None:
    """Confine this process and exec the runner; never returns."""
    status_fd = spec["status_fd"]
    try:
        if "pid" in layers["namespaces"] and "mount" in layers["namespaces"]:
            layers["proc"] = fresh_proc()
        os.chdir(spec["tmp"])  # the tmpfs now mounted there, not the directory under it
        if who == "nobody":
            layers["uid"] = become_nobody()
        elif who == "uid0":  # root, where nobody could not even start Python (or no uid to switch to)
            drop_capabilities()
            layers["uid"] = "root without capabilities"
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        if os.getppid() not in (launcher, 0):  # 0: the launcher is outside our pid namespace
            os._exit(1)
        layers["limits"] = set_limits(spec, uid0=who == "uid0", per_namespace="user" in layers["namespaces"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        layers["landlock"] = "skipped" if "landlock" in spec["skip"] else landlock(spec["tmp"])
        layers["seccomp"] = "skipped" if "seccomp" in spec["skip"] else seccomp(deny_processes=who == "uid0")
        os.write(status_fd, f"layers {json.dumps(layers)}\n".encode())
        os.close(status_fd)
        os.set_inheritable(spec["result_fd"], True)
        os.execve(sys.executable, [sys.executable, "-I", "-B", "-c", RUNNER, str(spec["result_fd"])], dict(os.environ))
    except BaseException as err:  # noqa: BLE001 - report anything, never run unconfined
        try:
            os.write(status_fd, f"error {type(err).__name__}: {err}\n".encode())
        finally:
            os._exit(70)


def fresh_proc() -> str:
    """/proc of the new pid namespace (the trainer's processes and their environ invisible);
    an empty tmpfs over /proc where the kernel refuses a proc mount."""
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return "own"
    except OSError:
        _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
        return "hidden"


def _readable_by_others(path: str) -> bool:
    """Whether `nobody` can reach and read `path` (every directory above it searchable)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for depth in range(1, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:depth]) or os.sep).st_mode
        if not mode & 0o001 or (depth == len(parts) and not mode & 0o004):
            return False
    return True


def nobody_can_run_python() -> bool:
    return all(_readable_by_others(p) for p in (sys.executable, os.path.dirname(os.__file__)))


def become_nobody() -> str:
    """Root becomes nobody, so the program cannot signal or ptrace the trainer, write root's files,
    or ignore RLIMIT_NPROC; setuid from 0 also clears every capability."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return "nobody"


def drop_capabilities() -> None:
    """Uid 0 without any capability, now and after exec: no root privileges through uid 0
    (SECBIT_NOROOT, locked), an empty bounding set, no ambient, effective, permitted or inheritable
    capability. Left: owning root's files (read-only mounts and Landlock confine the writes)."""
    securebits = 0b1110_1111  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS (off), NO_CAP_AMBIENT_RAISE, each locked
    _prctl(PR_SET_SECUREBITS, securebits)
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, f"dropping capability {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient capabilities")
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(_libc.capset(header, bytes(24)), "capset")  # two zeroed {effective, permitted, inheritable}


def set_limits(spec: dict, uid0: bool, per_namespace: bool) -> dict[str, object]:
    cpu = int(spec["timeout_s"]) + 1
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1), resource.RLIMIT_AS: (spec["memory_mb"] << 20,) * 2,
              resource.RLIMIT_FSIZE: (spec["file_mb"] << 20,) * 2, resource.RLIMIT_CORE: (0, 0),
              resource.RLIMIT_NOFILE: (256, 256)}
    for which, value in limits.items():
        resource.setrlimit(which, value)
    if uid0:  # the kernel never applies RLIMIT_NPROC to its uid 0, in any user namespace
        nproc: object = "not enforced (uid 0)"
    else:  # counted per user (per user namespace inside one): leave room for what runs already
        nproc = spec["max_processes"] + (0 if per_namespace else _processes_of(os.getuid()))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    return {"cpu_s": cpu, "memory_mb": spec["memory_mb"], "file_mb": spec["file_mb"], "nproc": nproc}


def _processes_of(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        try:
            count += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return count


# --- Landlock and seccomp -------------------------------------------------------------------------


def landlock(tmp: str) -> str:
    """Writes only beneath `tmp` and to /dev/null; with ABI 4+ no TCP bind/connect; with ABI 6+
    no signals to processes outside the sandbox. Returns what was applied."""
    abi = _libc.syscall(SYS_LANDLOCK_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    write = 0b1_1111_1111_0010  # WRITE_FILE, REMOVE_DIR/FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM
    write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # REFER, TRUNCATE
    net = 0b11 if abi >= 4 else 0  # BIND_TCP, CONNECT_TCP
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = struct.pack("QQQ", write, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE, attr, len(attr), 0)
    _check(ruleset, "landlock_create_ruleset")
    try:
        for path, allowed in ((tmp, write), (os.devnull, (1 << 1) | (1 << 14 if abi >= 3 else 0))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", allowed, fd)  # packed landlock_path_beneath_attr
                _check(_libc.syscall(SYS_LANDLOCK_ADD, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return f"ABI {abi}: writes only in the temporary directory" + (", no TCP" if net else "") + \
        (", no signals out" if scoped else "")


# (audit arch, x32 bit or 0, {name: number}) of the architectures the filter knows
_SYSCALLS = {
    "x86_64": (0xC000003E, 0x40000000, dict(
        socket=41, clone=56, fork=57, vfork=58, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297, ptrace=101, process_vm_readv=310, process_vm_writev=311, mount=165, umount2=166,
        pivot_root=155, unshare=272, setns=308, bpf=321, perf_event_open=298, keyctl=250, add_key=248,
        request_key=249, userfaultfd=323)),
    "aarch64": (0xC00000B7, 0, dict(
        socket=198, clone=220, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
        ptrace=117, process_vm_readv=270, process_vm_writev=271, mount=40, umount2=39, pivot_root=41, unshare=97,
        setns=268, bpf=280, perf_event_open=241, keyctl=219, add_key=217, request_key=218, userfaultfd=282)),
}
_COMMON = dict(pidfd_send_signal=424, io_uring_setup=425, pidfd_open=434, pidfd_getfd=438)
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL, _EPERM, _ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
AF_UNIX, CLONE_THREAD, SYS_CLONE3 = 1, 0x00010000, 435


def seccomp_program(machine: str, deny_processes: bool) -> list[tuple[int, int, int, int]] | None:
    """The filter as (code, jt, jf, k) instructions; None for an unknown architecture. With
    `deny_processes`, new processes are refused (threads are not: clone with CLONE_THREAD, and
    clone3 answers ENOSYS so the C library falls back to clone)."""
    if machine not in _SYSCALLS:
        return None
    arch, x32, numbers = _SYSCALLS[machine]
    denied = {**numbers, **_COMMON}
    socket, clone = denied.pop("socket"), denied.pop("clone")
    forks = [denied.pop(name) for name in ("fork", "vfork") if name in denied]
    prog = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL), (_LD_ABS, 0, 0, 0)]
    if x32:
        prog += [(_JGE, 0, 1, x32), (_RET, 0, 0, _EPERM)]
    for number in sorted(denied.values()) + (forks if deny_processes else []):
        prog += [(_JEQ, 0, 1, number), (_RET, 0, 0, _EPERM)]
    if deny_processes:
        prog += [(_JEQ, 0, 1, SYS_CLONE3), (_RET, 0, 0, _ENOSYS)]
        prog += _when_argument(clone, (_JSET, 0, 1, CLONE_THREAD))
    return prog + _when_argument(socket, (_JEQ, 0, 1, AF_UNIX)) + [(_RET, 0, 0, _ALLOW)]


def _when_argument(number: int, test: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """Syscall `number` is allowed when `test` holds for its first argument (low 32 bits, at
    offset 16 of seccomp_data on little-endian machines), else refused with EPERM."""
    return [(_JEQ, 0, 4, number), (_LD_ABS, 0, 0, 16), test, (_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM)]


def seccomp(deny_processes: bool) -> str:
    machine = os.uname().machine
    prog = seccomp_program(machine, deny_processes)
    if prog is None or sys.byteorder != "little":
        return f"unavailable (no filter for {machine})"
    filters = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(filters)
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0), "seccomp")
    return "kill, ptrace, sockets other than AF_UNIX, mount, unshare, io_uring, bpf denied" + \
        ("; new processes denied (RLIMIT_NPROC does not bind uid 0)" if deny_processes else "")


if __name__ == "__main__":
    main()
