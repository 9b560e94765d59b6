"""The sandbox's walls, one function each (Linux, standard library only, called before untrusted code runs).

launcher.py calls these in a fresh `python -I -S` interpreter; the trainer imports this module only
for its tests. Each function either puts its wall up or raises OSError, and the launcher reports
what held (docs/sandbox.md: its table says which wall stops which threat).

  namespaces  new pid, network, IPC and UTS namespaces (inside a user namespace when not root)
  view        a mount namespace whose root shows only what a Python program needs, read-only:
              the standard library (without site-packages), the shared libraries the interpreter
              maps, /dev/null, /dev/zero, /dev/random, /dev/urandom, its own /proc (read-only) and a
              private writable tmpfs of `file_mb`
  cgroup      the program's memory and tasks (processes and threads) bounded as a whole (root)
  uid         a uid of its own, owning nothing outside, so that uid checks confine it (root)
  limits      CPU time, address space per process, file size, open files, and RLIMIT_NPROC
  landlock    (filters.py) reads only of the view's paths, writes only in the temporary directory,
              no device ioctls, no TCP, no signals or abstract sockets outside
  seccomp     (filters.py) a syscall filter: no sockets, namespaces, mounts, signals to others,
              ptrace, shared memory, memfd, message queues, io_uring, bpf, keyrings, F_SETOWN,
              TIOCSTI; new processes (or threads) refused where nothing else bounds them
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import struct

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x04000000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP, CLONE_THREAD = 0x20000000, 0x40000000, 0x02000000, 0x00010000
NEW_NAMESPACES = (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
                  | CLONE_NEWCGROUP)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 4, 38, 36
PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 22, 24, 28, 47, 4
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 1 << 14, 1 << 18
MNT_DETACH, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 2, -100, 0x8000, 1
SYS_MOUNT_SETATTR = 442
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
UID_BASE = 0x6F700000  # root's sandboxes run as UID_BASE + 2 * (launcher pid) (+1 for the judge)

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def check(result: int, what: str) -> None:
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def prctl(option: int, value: int) -> None:
    check(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# --- namespaces ----------------------------------------------------------------------------------


def enter_namespaces(root: bool) -> list[str]:
    """New pid/net/IPC/UTS namespaces for the launcher's children (root: directly; others: inside a
    new user namespace where they are uid 1000); only user+net, or nothing, where the machine
    refuses more. The mount namespace comes later, in `enter_view`. Returns the names entered."""
    uid, gid = os.geteuid(), os.getegid()
    full = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    attempts = [(full, ["pid", "net", "ipc", "uts"])] if root else []
    attempts += [(CLONE_NEWUSER | full, ["user", "pid", "net", "ipc", "uts"]),
                 (CLONE_NEWUSER | CLONE_NEWNET, ["user", "net"])]
    for flags, names in attempts:
        if libc.unshare(ctypes.c_int(flags)) == 0:
            if flags & CLONE_NEWUSER:
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"1000 {uid} 1")
                _write("/proc/self/gid_map", f"1000 {gid} 1")
            return names
    return []


# --- the view: a root that shows only what a Python program needs --------------------------------


def _mapped_library_dirs() -> list[str]:
    """Folders of the shared libraries this interpreter has mapped (libc, libpython, libffi, ...):
    where the dynamic loader finds what the standard library's extension modules need."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and ".so" in os.path.basename(fields[5]):
                found.add(os.path.dirname(fields[5].strip()))
    return sorted(found)


def python_paths() -> dict[str, list[str]]:
    """What the view shows of the host: `read` paths (the standard library and the library folders),
    `hidden` folders inside them shown empty (site-packages), `devices`."""
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    read = sorted({stdlib, *_mapped_library_dirs(), *(p for p in ("/etc/ld.so.cache",) if os.path.exists(p))})
    hidden = [os.path.join(stdlib, name) for name in ("site-packages", "dist-packages")
              if os.path.isdir(os.path.join(stdlib, name))]
    return {"read": read, "hidden": hidden, "devices": [d for d in DEVICES if os.path.exists(d)]}


def others_can_read(paths: dict[str, list[str]], through_host: bool) -> bool:
    """Whether a uid of its own can read the view's files (`through_host`: reaching them through the
    host's folders, as without a view, e.g. no /root of mode 700 on the way)."""
    for path in (os.path.realpath(p) for p in paths["read"]):
        parts = path.split(os.sep)
        for depth in range(1 if through_host else len(parts), len(parts)):
            if not os.stat(os.sep.join(parts[:depth]) or os.sep).st_mode & 0o001:
                return False  # a folder on the way it cannot search
        mode = os.stat(path).st_mode
        if not mode & 0o004 or (os.path.isdir(path) and not mode & 0o001):
            return False
    return True


def _mirror(root: str, path: str) -> str:
    """Recreate in `root` the symlinks met on the way to `path` (/lib -> usr/lib); the real path."""
    real, todo = "/", [p for p in path.split("/") if p]
    hops = 0
    while todo:
        part = todo.pop(0)
        here = os.path.join(real, part)
        if os.path.islink(here) and hops < 40:
            hops += 1
            target = os.readlink(here)
            inside = root + here
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            if not os.path.lexists(inside):
                os.symlink(target, inside)
            todo = [p for p in target.split("/") if p] + todo
            real = "/" if target.startswith("/") else real
        else:
            real = os.path.normpath(here)
    return real


def _bind(root: str, source: str) -> None:
    """`source` at the same path in `root` (made read-only with the rest in `enter_view`; set-uid bits
    are void under no_new_privs)."""
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    mount(source, target, None, MS_BIND | MS_REC)


def build_view(root: str, paths: dict[str, list[str]], home: str, home_mb: int, owner: int | None) -> None:
    """In a new mount namespace: a tmpfs on `root` holding the read-only binds of `paths`, a writable
    tmpfs of `home_mb` MiB at `home` (owned by `owner`), empty /proc and /dev/fd links."""
    check(libc.unshare(ctypes.c_int(CLONE_NEWNS)), "unshare mount namespace")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back out
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for source in sorted({_mirror(root, p) for p in paths["read"]}, key=len):
        _bind(root, source)
    for source in paths["hidden"]:
        mount("tmpfs", root + source, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
    for device in paths["devices"]:
        _bind(root, device)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/proc", mode=0o555)
    os.makedirs(root + home, mode=0o755)
    owned = f",uid={owner},gid={owner}" if owner is not None else ""
    mount("tmpfs", root + home, "tmpfs", MS_NOSUID | MS_NODEV, f"size={home_mb}m,mode=0700{owned}")


def enter_view(root: str, home: str, own_proc: bool) -> str:
    """Make the built view this process's root (in a mount namespace of its own when `own_proc`,
    with a read-only /proc of its pid namespace), every mount read-only but `home`. What /proc is."""
    proc = "none"
    if own_proc:
        check(libc.unshare(ctypes.c_int(CLONE_NEWNS)), "unshare mount namespace")
        try:  # before the host's /proc is out of sight: the kernel wants one visible to allow it
            mount("proc", root + "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            proc = "own, read-only"
        except OSError:
            pass
    os.makedirs(root + "/.old", exist_ok=True)
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, "pivot_root: unknown architecture")
    check(libc.syscall(number, root.encode(), (root + "/.old").encode()), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    _mount_setattr("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)
    _mount_setattr(home, 0, 0, MOUNT_ATTR_RDONLY)
    os.chdir(home)
    return proc


def _mount_setattr(path: str, flags: int, attr_set: int, attr_clr: int) -> None:
    attr = struct.pack("QQQQ", attr_set, attr_clr, 0, 0)
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, attr, len(attr)), f"mount_setattr {path}")


# --- cgroups: memory and tasks as a whole ----------------------------------------------------------


def make_cgroup(name: str, memory_bytes: int, tasks: int) -> tuple[list[int], list[str], str]:
    """A memory and a pids cgroup (v2 where its controllers can be used, else v1) for one program:
    (open cgroup.procs fds to join through, folders to remove afterwards, description)."""
    v2 = _cgroup_v2_parent()
    if v2:
        folder = os.path.join(v2, name)
        os.mkdir(folder)
        try:
            _write(f"{folder}/memory.max", str(memory_bytes))
            if os.path.exists(f"{folder}/memory.swap.max"):
                _write(f"{folder}/memory.swap.max", "0")
            _write(f"{folder}/pids.max", str(tasks))
            return [os.open(f"{folder}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)], [folder], "v2 memory+pids"
        except OSError:
            os.rmdir(folder)
            raise
    folders: list[str] = []
    try:
        for controller, settings in (("memory", [("memory.limit_in_bytes", memory_bytes),
                                                 ("memory.memsw.limit_in_bytes", memory_bytes)]),
                                     ("pids", [("pids.max", tasks)])):
            folder = os.path.join(_cgroup_v1_parent(controller), name)
            os.mkdir(folder)
            folders.append(folder)
            for setting, value in settings:
                if os.path.exists(f"{folder}/{setting}"):
                    _write(f"{folder}/{setting}", str(value))
        return [os.open(f"{f}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for f in folders], folders, "v1 memory+pids"
    except OSError:
        remove_cgroups(folders)
        raise


def _own_cgroup(controller: str) -> str:
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    raise OSError(errno.ENOENT, f"no {controller or 'unified'} cgroup")


def _cgroup_v2_parent() -> str | None:
    """The v2 folder under which a child cgroup may have memory and pids: our own cgroup's, else the root's."""
    base = "/sys/fs/cgroup"
    if not os.path.exists(f"{base}/cgroup.controllers"):
        return None
    for folder in (base + _own_cgroup(""), base):
        try:
            with open(f"{folder}/cgroup.subtree_control") as handle:
                if {"memory", "pids"} <= set(handle.read().split()):
                    return folder
        except OSError:
            pass
    raise OSError(errno.EPERM, "no v2 cgroup with the memory and pids controllers delegated")


def _cgroup_v1_parent(controller: str) -> str:
    folder = f"/sys/fs/cgroup/{controller}"
    if not os.path.exists(f"{folder}/cgroup.procs"):
        raise OSError(errno.ENOENT, f"no v1 {controller} cgroup")
    return folder + _own_cgroup(controller)


def join_cgroup(fds: list[int]) -> None:
    for fd in fds:
        os.write(fd, b"0")  # 0: the writing process
        os.close(fd)


def remove_cgroups(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            pass


def sweep_stale_cgroups(prefix: str) -> None:
    """Remove the empty cgroups of launchers that died before removing theirs (trainer killed)."""
    for parent in _stale_parents():
        try:
            names = [n for n in os.listdir(parent) if n.startswith(prefix)]
        except OSError:
            continue
        for name in names:
            pid = name[len(prefix):].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                remove_cgroups([os.path.join(parent, name)])


def _stale_parents() -> list[str]:
    parents = []
    for probe in (_cgroup_v2_parent, lambda: _cgroup_v1_parent("memory"), lambda: _cgroup_v1_parent("pids")):
        try:
            folder = probe()
        except OSError:
            continue
        if folder:
            parents.append(folder)
    return parents


# --- who the program runs as ------------------------------------------------------------------------


def become(uid: int) -> None:
    """Root becomes `uid` (no groups): setuid from 0 also clears every capability."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def drop_capabilities() -> None:
    """No capability now or after exec: for uid 0 that must stay uid 0, and for the user namespace's
    uid 1000, which holds the namespace's capabilities until it drops them (we do not exec). SECBIT_NOROOT
    and friends locked, the bounding set emptied, no ambient, effective, permitted or inheritable one."""
    if os.geteuid() == 0:
        prctl(PR_SET_SECUREBITS, 0b1110_1111)  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS off, NO_CAP_AMBIENT_RAISE; locked
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0 and ctypes.get_errno() not in (errno.EINVAL,
                                                                                                          errno.EPERM):
            check(-1, f"dropping capability {cap}")
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient capabilities")
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    check(libc.capset(header, bytes(24)), "capset")


def set_limits(timeout_s: float, memory_mb: int, file_mb: int, nproc: int | None) -> dict[str, object]:
    cpu = int(timeout_s) + 1
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1), resource.RLIMIT_AS: (memory_mb << 20,) * 2,
              resource.RLIMIT_FSIZE: (file_mb << 20,) * 2, resource.RLIMIT_CORE: (0, 0),
              resource.RLIMIT_NOFILE: (256, 256)}
    if nproc is not None:
        limits[resource.RLIMIT_NPROC] = (nproc, nproc)
    for which, value in limits.items():
        resource.setrlimit(which, value)
    return {"cpu_s": cpu, "memory_mb": memory_mb, "file_mb": file_mb,
            "nproc": nproc if nproc is not None else "not enforced (uid 0)"}


def processes_of(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        try:
            count += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return count


def die_with_parent(parent: int) -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() not in (parent, 0):  # 0: the parent is outside our pid namespace
        os._exit(1)  # it is already gone
