"""The sandbox's kernel filters: Landlock (what paths, ports and signals the process may reach) and seccomp
(which system calls it may make). Standard library only, like walls.py, whose helpers it uses."""

from __future__ import annotations

import ctypes
import os
import struct
import sys

try:  # imported as opsd.verifiers.sandbox.filters (tests), or beside launcher.py in the sandbox
    from .walls import NEW_NAMESPACES, PR_SET_SECCOMP, check, libc
except ImportError:
    from walls import NEW_NAMESPACES, PR_SET_SECCOMP, check, libc

SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD, SYS_LANDLOCK_RESTRICT = 444, 445, 446

# --- Landlock ----------------------------------------------------------------------------------------

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR, _TRUNCATE, _IOCTL_DEV = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 14, 1 << 15
_MAKE_AND_REMOVE = 0b1_1111_1111_0000  # REMOVE_DIR/FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV


def landlock(read: list[str], writable: str | None, devices: list[str]) -> str:
    """Reads only beneath `read` (and /proc when it is the program's own), writes only beneath
    `writable` and to /dev/null; with ABI 4+ no TCP bind/connect; with ABI 5+ no device ioctls;
    with ABI 6+ no signals or abstract unix sockets outside the sandbox. What was applied."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    reading = _EXECUTE | _READ_FILE | _READ_DIR
    writing = _WRITE_FILE | _MAKE_AND_REMOVE | (1 << 13 if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    handled = reading | writing | (_IOCTL_DEV if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0  # BIND_TCP, CONNECT_TCP
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = struct.pack("QQQ", handled, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE, attr, len(attr), 0)
    check(ruleset, "landlock_create_ruleset")
    rules = [(path, reading) for path in _read_rules(read, writable)]
    rules += [(device, _READ_FILE) for device in devices]
    rules.append(("/dev/null", _READ_FILE | _WRITE_FILE | (_TRUNCATE if abi >= 3 else 0)))
    if writable:
        rules.append((writable, reading | writing))
    try:
        for path, allowed in rules:
            _landlock_rule(ruleset, path, allowed)
        check(libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    writes = "writes only in the temporary directory" if writable else "no writes"
    return (f"ABI {abi}: reads only of the standard library and shared libraries, {writes}" +
            (", no TCP" if net else "") + (", no device ioctls" if abi >= 5 else "") +
            (", no signals out" if scoped else ""))


def _read_rules(read: list[str], writable: str | None) -> list[str]:
    """The paths to allow reading: each of `read`, but a folder holding the standard library (the
    library folder of a pyenv or conda prefix) only for its files, so that site-packages stays
    out; /proc only when it is the program's own (in its pid namespace)."""
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    out = []
    for path in read:
        if os.path.isdir(path) and (stdlib + "/").startswith(path.rstrip("/") + "/") and path != stdlib:
            out += [e.path for e in os.scandir(path) if not e.is_dir(follow_symlinks=False)]
        elif path == stdlib:
            out += [e.path for e in os.scandir(path) if e.name not in ("site-packages", "dist-packages")]
        else:
            out.append(path)
    return out


def _landlock_rule(ruleset: int, path: str, allowed: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # not in this view: nothing to allow
    try:
        if not os.path.isdir(path):
            allowed &= _FILE_RIGHTS
        rule = struct.pack("=Qi", allowed, fd)  # packed landlock_path_beneath_attr
        check(libc.syscall(SYS_LANDLOCK_ADD, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
    finally:
        os.close(fd)


# --- seccomp -----------------------------------------------------------------------------------------

# (audit arch, x32 bit or 0, {name: number}) of the architectures the filter knows
_SYSCALLS = {
    "x86_64": (0xC000003E, 0x40000000, dict(
        socket=41, clone=56, fork=57, vfork=58, fcntl=72, ioctl=16, kill=62, tkill=200, tgkill=234,
        rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, ptrace=101, process_vm_readv=310, process_vm_writev=311,
        kcmp=312, mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272, setns=308, bpf=321,
        perf_event_open=298, keyctl=250, add_key=248, request_key=249, userfaultfd=323, shmget=29, shmat=30,
        msgget=68, memfd_create=319, open_by_handle_at=304, inotify_init=253, inotify_init1=294, fanotify_init=300,
        flock=73, fadvise64=221)),
    "aarch64": (0xC00000B7, 0, dict(
        socket=198, clone=220, fcntl=25, ioctl=29, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138,
        rt_tgsigqueueinfo=240, ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272, mount=40,
        umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268, bpf=280, perf_event_open=241, keyctl=219,
        add_key=217, request_key=218, userfaultfd=282, shmget=194, shmat=196, msgget=186, memfd_create=279,
        open_by_handle_at=265, inotify_init1=26, fanotify_init=262, flock=32, fadvise64=223)),
}
_COMMON = dict(pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
               open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434,
               pidfd_getfd=438, mount_setattr=442, memfd_secret=447)
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL, _EPERM, _ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
SYS_CLONE3 = 435
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15  # a signal to another process on I/O
F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW = 6, 7, 37, 38  # locks on the host's files seen through the view
FIOSETOWN, SIOCSPGRP, TIOCSTI, TIOCLINUX = 0x8901, 0x8902, 0x5412, 0x541C


def seccomp_program(machine: str, tasks: str) -> list[tuple[int, int, int, int]] | None:
    """The filter as (code, jt, jf, k) instructions; None for an unknown architecture. `tasks`: "any"
    (new processes and threads, without new namespaces: clone3 answers ENOSYS, so the C library falls
    back to clone, whose flags the filter can read) or "none" (no new process or thread)."""
    if machine not in _SYSCALLS:
        return None
    arch, x32, numbers = _SYSCALLS[machine]
    denied = {**numbers, **_COMMON}
    clone, fcntl, ioctl = denied.pop("clone"), denied.pop("fcntl"), denied.pop("ioctl")
    forks = [denied.pop(name) for name in ("fork", "vfork") if name in denied]
    prog = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL), (_LD_ABS, 0, 0, 0)]
    if x32:
        prog += [(_JGE, 0, 1, x32), (_RET, 0, 0, _EPERM)]
    for number in sorted(denied.values()) + (forks if tasks == "none" else []):
        prog += [(_JEQ, 0, 1, number), (_RET, 0, 0, _EPERM)]
    prog += [(_JEQ, 0, 1, SYS_CLONE3), (_RET, 0, 0, _ENOSYS)]
    prog += _argument_is_not(fcntl, 1, (F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW))
    prog += _argument_is_not(ioctl, 1, (FIOSETOWN, SIOCSPGRP, TIOCSTI, TIOCLINUX))
    if tasks == "none":
        prog += [(_JEQ, 0, 1, clone), (_RET, 0, 0, _EPERM)]
    else:  # clone with a namespace flag is refused
        prog += [(_JEQ, 0, 3, clone), (_LD_ABS, 0, 0, 16), (_JSET, 0, 1, NEW_NAMESPACES), (_RET, 0, 0, _EPERM)]
    return prog + [(_RET, 0, 0, _ALLOW)]


def _argument_is_not(number: int, index: int, values: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Syscall `number` is refused (EPERM) when argument `index` (its low 32 bits: offset 16 + 8 *
    index of seccomp_data, little-endian) is one of `values`, else allowed."""
    checks = [(_JEQ, len(values) - i, 0, value) for i, value in enumerate(values)]
    body = [(_LD_ABS, 0, 0, 16 + 8 * index)] + checks + [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM)]
    return [(_JEQ, 0, len(body), number)] + body


def seccomp(tasks: str) -> str:
    machine = os.uname().machine
    prog = seccomp_program(machine, tasks)
    if prog is None or sys.byteorder != "little":
        return f"unavailable (no filter for {machine})"
    filters = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(filters)
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf))
    check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0), "seccomp")
    refused = {"any": "", "none": "; new processes and threads refused"}[tasks]
    return ("sockets, namespaces, mounts, signals to others, ptrace, shared memory, memfd, io_uring, bpf, inotify, "
            "file locks refused" + refused)
