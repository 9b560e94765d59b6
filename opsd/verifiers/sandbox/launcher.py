"""The sandbox's launcher: three processes that grade one program, confined before any untrusted code runs.

Run by the trainer (opsd/verifiers/sandbox/__init__.py) as `python -I -S -B launcher.py SPEC` in a new
session, with a stripped environment and a fresh temporary directory as working directory. Standard
library only (walls.py, filters.py and inside.py beside it).

  launcher (this process, trusted): dies with the trainer, adopts orphans, enters new pid/net/IPC/UTS
      namespaces (inside a user namespace when not root), makes the program's cgroup (root), starts
      the judge, waits at most `timeout_s`, kills everything and removes the cgroup.
  judge (pid 1 of the new pid namespace; in the cgroup, with the candidate): builds the view (a mount namespace
      showing only what a Python program needs), starts the candidate in a pid namespace of its own, confines itself
      (its own uid, no writes, no new processes), then reads the job from stdin, sends the program
      to the candidate and runs the tests against it (inside.judge); only it writes the verdict.
  candidate (pid 1 of a nested pid namespace, forked before the judge has read the job, so the tests
      are in no memory it can read): enters the view with its own read-only /proc,
      becomes a uid of its own (or drops every capability), sets its limits, Landlock and seccomp,
      then runs the program and answers the judge's calls (inside.serve).
Each wall that held is reported to the trainer (a `layers` line on the status pipe).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import filters  # noqa: E402 - beside this file, found through the line above
import inside  # noqa: E402
import walls  # noqa: E402

CGROUP_PREFIX = "opsd-sandbox-"


def main() -> None:
    spec = json.loads(sys.argv[1])
    status = spec["status_fd"]
    try:
        sys.set_int_max_str_digits(0)  # big integers cross as text (bounded by the frame size)
        walls.die_with_parent(spec["parent_pid"])
        walls.prctl(walls.PR_SET_CHILD_SUBREAPER, 1)
        plan = prepare(spec)
        launcher = os.getpid()
        judge_pid = os.fork()
    except BaseException as err:  # reported to the parent, which grades 0
        os.write(status, f"error {type(err).__name__}: {err}\n".encode())
        os._exit(70)
    if judge_pid == 0:
        judge_process(spec, plan, launcher)
    os.close(0)
    for fd in plan["cgroup_fds"]:
        os.close(fd)
    os.write(status, f"pid {judge_pid}\n".encode())
    result = wait_for(judge_pid, spec["timeout_s"])
    sweep(judge_pid, "pid" in plan["namespaces"])
    walls.remove_cgroups(plan["cgroup_folders"])
    os.write(status, b"timeout\n" if result is None else f"exit {os.waitstatus_to_exitcode(result)}\n".encode())
    os._exit(0)


def prepare(spec: dict) -> dict:
    """The launcher's own steps: what the view will show, namespaces, the cgroup, the uids."""
    skip, root = set(spec["skip"]), os.geteuid() == 0
    plan: dict = {"paths": walls.python_paths(), "cgroup_fds": [], "cgroup_folders": [], "cgroup": "none"}
    plan["namespaces"] = [] if "namespaces" in skip else walls.enter_namespaces(root)
    in_userns = "user" in plan["namespaces"]
    if root and not in_userns and "cgroup" not in skip:
        try:
            walls.sweep_stale_cgroups(CGROUP_PREFIX)
            name = f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
            fds, folders, kind = walls.make_cgroup(name, spec["memory_mb"] << 20, spec["max_processes"])
            plan.update(cgroup_fds=fds, cgroup_folders=folders, cgroup=f"{kind}: {spec['memory_mb']} MiB, "
                                                                        f"{spec['max_processes']} tasks")
        except OSError as err:
            plan["cgroup"] = f"unavailable ({err.strerror or err})"
    plan["own_uids"] = root and not in_userns and "uid" not in skip
    base = walls.UID_BASE + 2 * os.getpid()
    plan["uids"] = (base, base + 1)  # candidate, judge
    return plan


def judge_process(spec: dict, plan: dict, launcher: int) -> None:
    """The judge: the view, the candidate, its own walls, then the tests. Never returns."""
    status, result = spec["status_fd"], spec["result_fd"]
    try:
        walls.die_with_parent(launcher)
        if plan["cgroup_fds"]:  # the judge and (inherited) the candidate: the memory of both bounded as a whole
            walls.join_cgroup(plan["cgroup_fds"])
        layers = {"namespaces": plan["namespaces"], "cgroup": plan["cgroup"]}
        can_view = "namespaces" not in spec["skip"] and (os.geteuid() == 0 or "user" in plan["namespaces"])
        layers["view"] = build_view(spec, plan) if can_view else "none (the host's filesystem)"
        view = layers["view"].startswith("only")
        if plan["own_uids"] and not walls.others_can_read(plan["paths"], through_host=not view):
            plan["own_uids"] = False  # a uid of its own could not read the Python install
        if plan["own_uids"] and not view:
            os.chown(spec["tmp"], plan["uids"][0], plan["uids"][0])
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        nested = "pid" in plan["namespaces"] and _new_pid_namespace()
        judge = os.getpid()
        if os.fork() == 0:
            os.close(requests_w)
            os.close(replies_r)
            candidate_process(spec, plan, view, judge if not nested else 0, requests_r, replies_w)
        os.close(requests_r)
        os.close(replies_w)
        first = inside.receive(replies_r)  # the candidate is confined (or failed) before we go on
        if not isinstance(first, dict) or "layers" not in first:
            reason = first.get("error") if isinstance(first, dict) else "it ended before reporting"
            raise OSError(f"the program's process could not be confined: {reason}")
        layers["program"] = first["layers"]
        layers["judge"] = confine_judge(spec, plan, view)
        os.write(status, f"layers {json.dumps(layers)}\n".encode())
        os.close(status)
        job = json.loads(_read_all(0))
        os.close(0)
        verdict = inside.judge(job, requests_w, replies_r)
        os.write(result, f"{'pass' if verdict.passed else 'fail'} {job['nonce']} "
                         f"{verdict.kind}\n{verdict.reason}".encode())
        os._exit(0)
    except BaseException as err:  # report anything, never grade without the walls
        try:
            os.write(status, f"error {type(err).__name__}: {err}\n".encode())
        finally:
            os._exit(70)


def build_view(spec: dict, plan: dict) -> str:
    try:
        owner = plan["uids"][0] if plan["own_uids"] else None
        walls.build_view(spec["tmp"], plan["paths"], spec["tmp"], spec["file_mb"], owner)
        return "only the standard library, shared libraries and 4 devices, read-only; a private tmpfs"
    except OSError as err:
        return f"none ({err})"


def _new_pid_namespace() -> bool:
    try:
        walls.check(walls.libc.unshare(walls.CLONE_NEWPID), "unshare pid namespace")
        return True
    except OSError:
        return False


def candidate_process(spec: dict, plan: dict, view: bool, judge: int, requests: int, replies: int) -> None:
    """The candidate's walls, then the program (inside.serve). `judge`: its pid, 0 when the candidate
    is in a pid namespace of its own. Never returns."""
    nested = judge == 0
    try:
        walls.die_with_parent(judge)
        for fd in (0, spec["status_fd"], spec["result_fd"]):
            os.close(fd)
        layers: dict = {}
        layers["proc"] = walls.enter_view(spec["tmp"], spec["tmp"], own_proc=nested) if view else "the host's"
        if not view:
            os.chdir(spec["tmp"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        layers["uid"], layers["limits"], tasks = _become_program(spec, plan)
        walls.prctl(walls.PR_SET_NO_NEW_PRIVS, 1)
        read = plan["paths"]["read"] + (["/proc"] if layers["proc"].startswith("own") else [])
        layers["landlock"] = ("skipped" if "landlock" in spec["skip"]
                              else filters.landlock(read, spec["tmp"], plan["paths"]["devices"]))
        layers["seccomp"] = "skipped" if "seccomp" in spec["skip"] else filters.seccomp(tasks)
        inside.send(replies, {"layers": layers})
    except BaseException as err:  # never run the program without its walls
        try:
            inside.send(replies, {"error": f"{type(err).__name__}: {err}"})
        finally:
            os._exit(70)
    inside.serve(requests, replies)
    os._exit(0)


def _become_program(spec: dict, plan: dict) -> tuple[str, dict, str]:
    """(who, limits, which new tasks seccomp allows). A uid of its own: RLIMIT_NPROC binds it. Uid 0
    (root where no uid of its own can read Python): no capabilities; new tasks refused unless the
    pids cgroup bounds them. A user's uid: RLIMIT_NPROC counted on top of what the user runs."""
    root = os.geteuid() == 0 and "user" not in plan["namespaces"]
    bounded = bool(plan["cgroup_fds"])
    if plan["own_uids"]:
        walls.become(plan["uids"][0])
        who, nproc = f"uid {plan['uids'][0]} (its own)", spec["max_processes"]
    elif root:
        walls.drop_capabilities()
        who, nproc = "root without capabilities", None
    else:
        if "user" in plan["namespaces"]:
            walls.drop_capabilities()
        own_count = 0 if "user" in plan["namespaces"] else walls.processes_of(os.getuid())
        who, nproc = "the user's", spec["max_processes"] + own_count
    walls.prctl(walls.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    limits = walls.set_limits(spec["timeout_s"], spec["memory_mb"], spec["file_mb"], nproc)
    tasks = "any" if (nproc is not None or bounded) else "none"
    return who, limits, tasks


def confine_judge(spec: dict, plan: dict, view: bool) -> dict:
    """The judge's own walls: its view, a uid of its own (or no capabilities), no dumping, limits,
    Landlock with no writes at all, seccomp with no new tasks."""
    if view:
        walls.enter_view(spec["tmp"], spec["tmp"], own_proc=False)
    if plan["own_uids"]:
        walls.become(plan["uids"][1])
        who, nproc = f"uid {plan['uids'][1]} (its own)", 1
    else:
        if os.geteuid() == 0 or "user" in plan["namespaces"]:
            walls.drop_capabilities()
        who, nproc = "the launcher's, without capabilities", None
    walls.prctl(walls.PR_SET_PDEATHSIG, signal.SIGKILL)
    walls.prctl(walls.PR_SET_DUMPABLE, 0)  # no /proc/<judge>/mem for a process of the same uid
    walls.set_limits(spec["timeout_s"], spec["memory_mb"], spec["file_mb"], nproc)
    walls.prctl(walls.PR_SET_NO_NEW_PRIVS, 1)
    lock = "skipped" if "landlock" in spec["skip"] else filters.landlock(plan["paths"]["read"], None,
                                                                       plan["paths"]["devices"])
    filtered = "skipped" if "seccomp" in spec["skip"] else filters.seccomp("none")
    return {"uid": who, "landlock": lock, "seccomp": filtered}


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# --- waiting and killing ---------------------------------------------------------------------------


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


if __name__ == "__main__":
    main()
