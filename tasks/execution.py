"""Run untrusted Python (a model's HumanEval completion with its tests) in a separate, limited process.

`execute(program, limits)` runs `program` in a fresh interpreter (`python -I` on this very file, which then
confines itself before it runs the program) and returns an `ExecutionResult`: passed, or not with a reason,
"failed" (an exception or a nonzero exit; `error` holds the traceback's last line), "timeout", "cpu", "memory"
or "killed". It never hangs the evaluator: the parent waits at most `limits.timeout` seconds of wall clock, then
kills the child's whole process group, and kills it again after a normal exit, so that no background process
outlives a run.

What holds the program in. The kernel enforces the first group; `ExecutionResult.layers` names those that were in
force for a run, since some depend on what the machine allows:

- always: its own session and process group (SIGKILL to the group at the deadline and after the exit);
  RLIMIT_AS (memory), RLIMIT_CPU (SIGKILL at the limit), RLIMIT_FSIZE (every file it writes, stdout and stderr
  included, since they are files), RLIMIT_NOFILE, RLIMIT_CORE = 0; a fresh, empty working folder.
- processes, RLIMIT_NPROC: it counts every process of a user, and root is exempt from it, so an evaluator running
  as root starts the program under a uid of its own (`SANDBOX_UID_BASE` + the child's pid, unique among live
  processes) with every capability dropped except CAP_DAC_READ_SEARCH (to read the interpreter wherever it is
  installed), an empty bounding set and no_new_privs: the kernel then caps the program at `limits.processes`
  processes, it owns nothing but its working folder, and it cannot signal the evaluator. The parent also kills
  every process of that uid at the end. Not root: the limit is the user's current count plus `limits.processes`
  (or just `limits.processes` inside a new user namespace, which counts its own), and where there is neither a uid
  of its own nor a pid namespace, the final kill also finds the processes that left the group by the
  TRITONCHAT_SANDBOX mark in the environment they were forked with (an exec with a fresh environment would lose
  it: the guard refuses exec, the kernel does not).
- file system, as root without namespaces: writes land only where the uid may write, its folder and the
  world-writable ones (/tmp, /dev/shm), the latter refused by the guard alone.
- namespaces, where unshare(2) is allowed (root with CAP_SYS_ADMIN, or an unprivileged user namespace): a new
  network namespace (no interface is up: no network at all), a new pid namespace (when its first process dies the
  kernel kills every other one, even those that left the process group) and a new mount namespace in which every
  mount except the working folder is remounted read-only.

The in-process guard (Python level, `guard=True`) comes on top, to refuse early with a clear message and where a
layer above is missing: os.fork, exec*, spawn*, system, posix_spawn, subprocess, multiprocessing, os.kill, setsid
and ctypes are refused; open, io.open, io.FileIO and os.open for writing, and os.remove, rename, mkdir, chmod and
the other path mutators, outside the working folder are refused; socket creation is refused. A determined program
can get around the guard (it holds references to the real functions); it cannot get around the kernel's limits.

The HumanEval program is built the way the reference builds it: the prompt's import lines, the code of the
model's answer (its first fenced block, else the whole answer), the test code, then `check(entry_point)`.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

SANDBOX_UID_BASE = 2_000_000_000  # + the child's pid: a uid no account uses, one per live sandbox


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall clock, seconds
    cpu_seconds: int | None = None  # RLIMIT_CPU; None: the timeout rounded up, plus one
    memory_bytes: int = 256 << 20  # RLIMIT_AS, the address space (the interpreter itself maps about 20 MB)
    processes: int = 8  # RLIMIT_NPROC: processes and threads the program may have, itself included
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file it may write, stdout and stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    output_chars: int = 20_000  # the end of stdout and of stderr kept in the result

    def cpu(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout) + 1


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    reason: str  # "passed", "failed", "timeout", "cpu", "memory" or "killed"
    error: str | None  # the traceback's last line, or the limit that stopped it; None when passed
    stdout: str
    stderr: str
    seconds: float  # wall clock, from the start of the interpreter until its last process is gone
    layers: tuple[str, ...]  # the kernel-enforced layers in force, as the child reported them
    pid: int  # the child's pid, which is also its process group
    uid: int | None  # the uid the program ran under when the evaluator is root, else None
    mark: str  # TRITONCHAT_SANDBOX=<mark> is in the environment every process of the sandbox starts from


# ----------------------------------------------------------------------------- HumanEval programs

_FENCED = re.compile(r"```(?:python)?[^\S\n]*\n(.*?)\n```", re.DOTALL)


def extract_code(answer: str) -> str:
    """The first fenced code block of a model's answer (```python or ```), else the whole answer; stripped."""
    match = _FENCED.search(answer)
    return (match.group(1) if match else answer).strip()


def prompt_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (blank and comment lines skipped, up to the first other)."""
    imports = []
    for line in prompt.splitlines():
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def humaneval_program(prompt: str, answer: str, test: str, entry_point: str) -> str:
    """The program that decides a HumanEval item: the prompt's imports, the answer's code (which defines the whole
    function, signature included, as an SFT model writes it), the item's test code, and the call of its check."""
    return f"{prompt_imports(prompt)}\n\n{extract_code(answer)}\n\n{test}\ncheck({entry_point})"


# ----------------------------------------------------------------------------- the parent


def execute(program: str, limits: Limits = Limits(), guard: bool = True, namespaces: bool = True) -> ExecutionResult:
    """Run `program` (Python source) in a confined child process and report how it ended. Never raises for what
    the program does, and returns within `limits.timeout` plus the time it takes to kill and reap the child.
    `guard=False` and `namespaces=False` leave out those layers, to see what the others hold on their own."""
    uid = SANDBOX_UID_BASE if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="tritonchat-sandbox-") as private:
        work = os.path.join(private, "work")
        os.mkdir(work, 0o700)
        files = {name: os.path.join(private, name) for name in ("program", "stdout", "stderr", "report")}
        with open(files["program"], "w", encoding="utf-8") as f:
            f.write(program)
        with (open(files["program"], "rb") as stdin, open(files["stdout"], "wb") as out,
              open(files["stderr"], "wb") as err, open(files["report"], "wb") as report):
            config = {"work": work, "limits": asdict(limits), "guard": guard, "namespaces": namespaces,
                      "report_fd": report.fileno()}
            mark = f"{os.getpid()}-{time.time_ns()}-{os.urandom(4).hex()}"
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "OMP_NUM_THREADS": "1",
                   "TRITONCHAT_SANDBOX": mark}
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)],
                                    stdin=stdin, stdout=out, stderr=err, pass_fds=(report.fileno(),), cwd=work,
                                    env=env, start_new_session=True)
            uid = uid + proc.pid if uid is not None else None
            exited = _wait_exit(proc.pid, limits.timeout)
            kill_sandbox(proc.pid, uid, mark)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.monotonic() - start
        layers, stdout, stderr = [], _tail(files["stdout"], limits), _tail(files["stderr"], limits)
        with open(files["report"], encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    layers += json.loads(line).get("layers", [])
                except ValueError:
                    pass
        _remove_tree(work)

    code, cpu_used = proc.returncode, usage.ru_utime + usage.ru_stime
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), None)
    if not exited:
        reason, error = "timeout", f"wall-clock limit of {limits.timeout:g} s"
    elif code == 0:
        reason, error = "passed", None
    elif code < 0 and -code in (signal.SIGKILL, signal.SIGXCPU) and cpu_used >= limits.cpu() - 0.05:
        reason, error = "cpu", f"CPU-time limit of {limits.cpu()} s"
    elif code < 0:
        reason, error = "killed", f"killed by {signal.Signals(-code).name}"
    elif last is not None and last.startswith("MemoryError"):
        reason, error = "memory", f"{last} (address-space limit of {limits.memory_bytes >> 20} MiB)"
    else:
        reason, error = "failed", last or f"exit status {code}"
    return ExecutionResult(reason == "passed", reason, error, stdout, stderr, seconds, tuple(layers), proc.pid, uid,
                           mark)


def sandbox_processes(pgid: int, uid: int | None = None, mark: str | None = None) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, or running as `uid`, or started from an environment
    with TRITONCHAT_SANDBOX=`mark` (which finds those that left the group, where the sandbox has no uid of its own
    and no pid namespace: the initial environment a process shows in /proc is the one fork copied), from /proc."""
    needle = f"\0TRITONCHAT_SANDBOX={mark}\0".encode() if mark else None
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            owner = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue  # gone meanwhile
        if fields[0] == b"Z":
            continue
        if int(fields[2]) == pgid or (uid is not None and owner == uid) or (needle and _environ_has(name, needle)):
            found.append(int(name))
    return found


def kill_sandbox(pgid: int, uid: int | None = None, mark: str | None = None, patience: float = 2.0) -> None:
    """SIGKILL the process group `pgid` and every process `sandbox_processes` finds, until /proc shows none alive
    (or `patience` seconds pass: a killed process may take a moment to exit)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        alive = [pid for pid in sandbox_processes(pgid, uid, mark) if pid != os.getpid()]
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not alive or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _environ_has(pid: str, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in b"\0" + f.read()
    except OSError:
        return False


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until child `pid` has exited, without reaping it (so that its pid still names the group); False on
    timeout."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd is not None:
                select.select([fd], [], [], left)
            else:
                time.sleep(min(left, 0.01))
    finally:
        if fd is not None:
            os.close(fd)


def _tail(path: str, limits: Limits) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * limits.output_chars))
        return f.read().decode("utf-8", errors="replace")[-limits.output_chars:]


def _remove_tree(path: str) -> None:
    """Remove the working folder even where the program took away its permissions."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the child: confine, then run

# <linux/sched.h>, <linux/prctl.h>, <linux/capability.h>, <sys/mount.h>
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 8, 24, 38
CAP_DAC_READ_SEARCH, LINUX_CAPABILITY_VERSION_3 = 2, 0x20080522
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
# statvfs f_flag bits -> the mount flags a bind remount must repeat (the kernel keeps them locked otherwise)
_KEPT_FLAGS = {2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # nosuid nodev noexec noatime ... relatime


def _child() -> None:
    import ctypes
    import linecache
    import resource
    import traceback

    config = json.loads(sys.argv[1])
    limits, work = Limits(**config["limits"]), config["work"]
    report = os.fdopen(config["report_fd"], "w")
    source = sys.stdin.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.dont_write_bytecode = True
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    uid = SANDBOX_UID_BASE + os.getpid() if root else None
    layers = ["process group", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE"]

    # from here on, in namespaces: pid 1 of a new pid namespace
    userns = config["namespaces"] and _enter_namespaces(libc, work, root, layers, report)
    nproc = limits.processes if (root or userns) else _user_processes(os.getuid()) + limits.processes
    for limit, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_CPU, limits.cpu()),
                         (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                         (resource.RLIMIT_NPROC, nproc)):
        resource.setrlimit(limit, (value, value))
    layers.append(f"RLIMIT_NPROC={nproc}" + (f" under uid {uid}" if root else ""))
    _drop_privileges(libc, uid, work, layers)
    report.write(json.dumps({"layers": layers}) + "\n")
    report.close()
    if config["guard"]:
        _install_guard(work)
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")  # for tracebacks
    code, namespace = compile(source, "<program>", "exec"), {"__name__": "__main__"}
    del config, libc, report, source
    try:
        exec(code, namespace)
    except SystemExit:
        raise
    except BaseException as e:  # the program's frames only; its globals go first, a MemoryError's frames too
        namespace.clear()
        trace = None if isinstance(e, MemoryError) else e.__traceback__.tb_next
        traceback.print_exception(type(e), e.with_traceback(None), trace)
        raise SystemExit(1) from None


def _enter_namespaces(libc, work: str, root: bool, layers: list, report) -> bool:
    """New network, pid and mount namespaces (and a user namespace when not root), where unshare(2) is allowed;
    every mount but `work` read-only. The calling process stays outside the new pid namespace: it forks the
    namespace's first process, which returns here, and itself waits for it and exits the way it did."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags) != 0:
        return False
    if not root:  # map our own ids into the new user namespace
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        layers.append("user namespace")
    layers += ["network namespace", "pid namespace"]
    if _read_only_mounts(libc, work):
        layers.append("read-only mounts but the working folder")
    report.flush()
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the namespace dies with the process above it
        return not root
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):  # die of the same signal
        if os.WTERMSIG(status) != signal.SIGKILL:
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _read_only_mounts(libc, work: str) -> bool:
    """In a new mount namespace: keep mount events private, bind `work` onto itself, remount all else read-only."""
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    if libc.mount(work.encode(), work.encode(), None, MS_BIND, None) != 0:
        return False
    os.chdir(work)  # the working directory was the folder under the new mount, which becomes read-only
    ok = True
    with open("/proc/self/mountinfo", "rb") as f:
        points = [re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4]) for line in f]
    for point in points:
        if point == work.encode():
            continue
        try:
            kept = os.statvfs(point).f_flag
        except OSError:
            continue  # hidden under another mount
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | sum(m for s, m in _KEPT_FLAGS.items() if kept & s)
        ok &= libc.mount(None, point, None, flags, None) == 0
    return ok


def _drop_privileges(libc, uid: int | None, work: str, layers: list) -> None:
    """Empty the bounding set; as root, become `uid` (owner of `work`) keeping only CAP_DAC_READ_SEARCH; then no
    capabilities beyond that, and no_new_privs (an exec can never gain any)."""
    import ctypes

    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly without CAP_SETPCAP
    keep = 0
    if uid is not None:
        os.chown(work, uid, uid)
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        keep = 1 << CAP_DAC_READ_SEARCH

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)(Data(keep, keep, 0), Data(0, 0, 0))
    if libc.capset(ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), data) == 0 and uid is not None:
        layers.append("capabilities dropped but CAP_DAC_READ_SEARCH")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _user_processes(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        try:
            count += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return count


def _install_guard(work: str) -> None:
    """Replace the Python-level ways out with functions that raise PermissionError (see the module docstring)."""
    import builtins
    import io

    def refused(what):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")

        return refuse

    def check(path, dir_fd=None):
        if isinstance(path, int):
            return  # an open descriptor
        path = os.fsdecode(path)
        if dir_fd is not None:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = os.path.realpath(path)
        if path != work and not path.startswith(work + os.sep):
            raise PermissionError(f"sandbox: writing outside the working folder is not allowed: {path}")

    writes = ("w", "a", "x", "+")
    real_open, real_os_open, real_fileio = io.open, os.open, io.FileIO

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in writes):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    class FileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in writes):
                check(file)
            super().__init__(file, mode, *args, **kwargs)

    def mutator(real):
        def guarded(*args, **kwargs):
            for arg in args[:2]:
                if isinstance(arg, (str, bytes, os.PathLike)):
                    check(arg, kwargs.get("dir_fd"))
            return real(*args, **kwargs)

        return guarded

    builtins.open = io.open = open_
    os.open, io.FileIO = os_open, FileIO
    for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "rename", "renames", "replace",
                 "link", "symlink", "chmod", "lchmod", "chown", "lchown", "truncate", "utime", "mkfifo", "mknod"):
        if hasattr(os, name):
            setattr(os, name, mutator(getattr(os, name)))
    for name in dir(os):
        if name.startswith(("exec", "spawn", "posix_spawn", "fork", "set", "kill")) or name in (
                "system", "popen", "chroot", "fchmod", "fchown", "register_at_fork", "unshare", "setns"):
            if callable(getattr(os, name)) and name not in ("set_blocking", "set_inheritable"):
                setattr(os, name, refused(f"os.{name}"))
    import _posixsubprocess
    import socket
    import subprocess as subprocess_

    subprocess_.Popen = refused("starting a process")
    _posixsubprocess.fork_exec = refused("starting a process")
    for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server"):
        setattr(socket, name, refused("network access"))
    socket._socket.socket = refused("network access")
    for name in ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "resource"):
        sys.modules[name] = None  # import raises ImportError


if __name__ == "__main__":
    _child()
