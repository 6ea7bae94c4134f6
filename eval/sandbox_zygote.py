"""The sandbox's worker process (a "zygote"): run as a script by eval/sandbox.py's pool, one per worker.

It makes its namespaces once (eval/sandbox_sys.py), answers a self test, then reads programs from its control
pipe (length-prefixed JSON) and forks one process per program: own PID/mount/IPC namespaces, rlimits, the
unprivileged uid, then exec() of the program; it watches the program's pipes until it exits or its deadline
passes and replies with the Outcome. eval/sandbox.py documents the layers, the threat model and the verdicts.
Only the standard library is imported here: every fork copies this process, so it stays small and single-threaded.
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import json
import math
import os
import resource
import select
import signal
import sys
import time
import types
from dataclasses import asdict

import sandbox_channel as channel  # run as a script: this directory is sys.path[0]
import sandbox_sys as sx
from sandbox import HEADER, PRELOAD, REPORT_FD, Limits, Outcome, read_exact


class _Zygote:
    """The warm worker: sets up the namespaces once, then forks one process per program."""

    def __init__(self, ctl_in: int, ctl_out: int, uid: int, disable: set[str] = frozenset()):
        self.ctl_in, self.ctl_out = ctl_in, ctl_out
        self.disable = disable  # layers the caller asked us not to set up (tests of the others)
        self.root = os.geteuid() == 0
        self.uid = uid  # this worker's own unprivileged uid (and gid), when root
        self.layers = {"uid_drop": self.root, "user_ns": False, "net_ns": False, "mount_ns": False,
                       "read_only": False, "pid_ns": False, "seccomp": False, "oom_score_adj": False,
                       "cgroup": False, "devpts": False, "minimal_root": False}  # fmt: skip
        self.pidns_fd = -1
        self.cgroups: sx.Cgroups | None = None
        self.cgroup_paths: list[str] = []  # as the host sees them (the evaluator removes them when we are gone)
        self.ooms = 0  # the cgroup's OOM-kill count after the last run
        self.shadowed: list[tuple[str, str]] = []  # (stashed bind, path): interpreter files under a per-run tmpfs

    # Setup, once per zygote. Every step is optional; what worked is reported in `layers`.
    def isolate(self) -> None:
        with contextlib.suppress(OSError):  # orphans of a run reparent here (not to host init) and get reaped
            sx.prctl(sx.PR_SET_CHILD_SUBREAPER, 1)
        with contextlib.suppress(OSError):  # inherited by every program (which cannot lower it): under memory
            if "oom_score_adj" not in self.disable:  # pressure the kernel kills a run, not the evaluator
                _write("/proc/self/oom_score_adj", "1000")
                self.layers["oom_score_adj"] = True
        if self.root:
            for name, flag in (("net_ns", sx.CLONE_NEWNET), ("mount_ns", sx.CLONE_NEWNS)):
                if name in self.disable:
                    continue
                with contextlib.suppress(OSError):
                    sx.unshare(flag)
                    self.layers[name] = True
        else:
            uid, gid = os.getuid(), os.getgid()
            with contextlib.suppress(OSError):
                sx.unshare(sx.CLONE_NEWUSER | sx.CLONE_NEWNET | sx.CLONE_NEWNS)
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                self.layers.update(user_ns=True, net_ns=True, mount_ns=True)
        with contextlib.suppress(OSError):  # before the mounts turn read-only
            if "cgroup" not in self.disable:
                self.cgroups = sx.Cgroups.create(f"qat-sandbox-{os.getpid()}")
            self.layers["cgroup"] = self.cgroups is not None
            self.cgroup_paths = list(self.cgroups.dirs) if self.cgroups else []
        if self.layers["mount_ns"]:
            try:
                sx.mount(None, "/", None, sx.MS_REC | sx.MS_PRIVATE)  # nothing we mount propagates to the host
                if os.path.isdir("/run"):  # host daemons' sockets and the world-writable /run/lock
                    sx.mount("tmpfs", "/run", "tmpfs", sx.MS_NOSUID | sx.MS_NODEV, "mode=755,size=1m")
                # interpreter files under /tmp or /dev/shm (a venv in a temp dir, as in CI) would be hidden by each
                # run's own tmpfs there: stash a bind of them in /run, and each run binds them back (read-only)
                stash = {p: f"/run/interp/{i}" for i, p in enumerate(
                    q for q in sx.interpreter_paths() if q.startswith(("/tmp/", "/dev/shm/")))}  # fmt: skip
                self.shadowed = [(dst, src) for src, dst in stash.items()]
                if self.root and "minimal_root" not in self.disable:
                    try:
                        self._minimal_root(stash)
                        self.layers["minimal_root"] = True
                    except OSError:  # keep the read-only view of the host, with what the interpreter needs
                        sx.expose(sx.interpreter_dirs())
                elif self.root:
                    sx.expose(sx.interpreter_dirs())
                if not self.layers["minimal_root"]:
                    for src, dst in stash.items():
                        sx.bind(src, dst)
                sx.read_only_mounts(skip=sx.CGROUP_TYPES)  # the zygote sets each run's limits; runs see them ro
                self.layers["read_only"] = True
            except OSError:
                self.layers["mount_ns"] = False  # per-run mounts would fail too: use a host temp dir instead
        with contextlib.suppress(OSError):
            if "pid_ns" in self.disable:
                raise OSError("disabled")
            self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
            sx.unshare(sx.CLONE_NEWPID)  # probe: children of the next fork would get a fresh PID namespace...
            try:
                sx.check(sx.libc.setns(self.pidns_fd, sx.CLONE_NEWPID), "setns")  # ...undone at once
            except OSError:
                self._become_pid1()
            self.layers["pid_ns"] = True
        self.layers["seccomp"] = ("seccomp" not in self.disable and sx.seccomp_available()
                                  and self._probe(sx.install_seccomp))  # fmt: skip
        self.layers["devpts"] = ("devpts" not in self.disable and self.layers["mount_ns"]
                                 and self._probe(lambda: (sx.unshare(sx.CLONE_NEWNS), _own_devpts())))  # fmt: skip

    @staticmethod
    def _probe(setup) -> bool:
        """Whether `setup()` works in a child process (so nothing it changes touches this one)."""
        pid = os.fork()
        if pid == 0:
            try:
                sx.prctl(sx.PR_SET_NO_NEW_PRIVS, 1)
                setup()
                os._exit(0)
            except BaseException:
                os._exit(1)
        return os.waitpid(pid, 0)[1] == 0

    def _minimal_root(self, stash: dict[str, str]) -> None:
        """Pivot into a root built from an allowlist (sandbox_sys.pivot_into_minimal_root), on a tmpfs in /run;
        `stash`: {interpreter path under a per-run tmpfs: where the new root keeps a bind of it}."""
        new = "/run/qat-root"
        os.mkdir(new, 0o755)
        sx.mount("tmpfs", new, "tmpfs", sx.MS_NOSUID | sx.MS_NODEV, "mode=755,size=4m,nr_inodes=8192")
        cgroups = {d: f"/run/cgroup/{i}" for i, d in enumerate(self.cgroups.dirs)} if self.cgroups else {}
        users = f"root:x:0:0::/root:/bin/false\nsandbox:x:{self.uid}:{self.uid}::/tmp/sandbox:/bin/false\n"
        groups = f"root:x:0:\nsandbox:x:{self.uid}:\n"
        etc = {"passwd": users, "group": groups, "hosts": "127.0.0.1 localhost\n"}
        sx.pivot_into_minimal_root(new, {**cgroups, **stash}, etc)
        if self.cgroups:
            self.cgroups.dirs = list(cgroups.values())

    def _become_pid1(self) -> None:
        """Serve from pid 1 of the PID namespace just created (used inside a user namespace).

        There we may not setns() back into the host's PID namespace, which belongs to the host's user namespace,
        but we may re-enter one we created: so fork once, serve from the child, and let this process just wait.
        """
        child = os.fork()
        if child:
            status = os.waitpid(child, 0)[1]  # the evaluator kills us -> PR_SET_PDEATHSIG kills the child
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        sx.prctl(sx.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(self.pidns_fd)
        self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)

    def serve(self) -> None:
        probe = self.run_one({"program": "import math, json, collections\nassert math.gcd(4, 6) == 2\n",
                              "timeout": 30.0, "limits": asdict(Limits())})  # fmt: skip
        error = None if probe["status"] == "passed" else f"self test {probe['status']}: {probe['detail']}"
        self.send({"layers": self.layers, "error": error, "cgroups": self.cgroup_paths})
        # Everything this process holds now is in every program's process too. Freezing it keeps the garbage
        # collector of each forked process from walking (and so copying, page by page) the worker's objects.
        gc.collect()
        gc.freeze()
        while (head := read_exact(self.ctl_in, HEADER.size)) is not None:
            body = read_exact(self.ctl_in, HEADER.unpack(head)[0])
            if body is None:
                break
            self.send({**self.run_one(json.loads(body)), "layers": [k for k, on in self.layers.items() if on]})
        # the cgroups are removed by the evaluator once this process is gone (eval/sandbox.py, _Worker.kill)

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        data = HEADER.pack(len(data)) + data
        while data:
            data = data[os.write(self.ctl_out, data) :]

    # One run: fork the program, watch its pipes until it exits or the deadline passes, decide the verdict.
    def run_one(self, req: dict) -> dict:
        program = req["program"] if "program" in req else (req["candidate"], req["tests"])
        timeout, lim = float(req["timeout"]), Limits(**req["limits"])
        nonce = os.urandom(16).hex()
        pipes = {name: os.pipe() for name in ("out", "err", "report")}
        host_tmp = None
        if not self.layers["mount_ns"]:
            import tempfile

            host_tmp = tempfile.mkdtemp(prefix="sandbox-")
            if self.root:
                os.chown(host_tmp, self.uid, self.uid)
        t0, error, ooms = time.monotonic(), "", 0
        try:
            if self.cgroups:  # this run's limits on all its processes together (the cgroup is empty now)
                self.cgroups.limit(lim.memory_mb << 20, lim.processes)
                ooms = self.ooms
            if self.layers["pid_ns"]:
                sx.unshare(sx.CLONE_NEWPID)  # the next child is pid 1 of a fresh PID namespace
            pid = os.fork()
        except OSError as e:
            pid, error = -1, f"fork failed: {e}"  # or the cgroup refused its limits
        if pid == 0:
            self._program(program, timeout, lim, nonce, pipes, host_tmp)  # never returns
        if self.layers["pid_ns"]:
            sx.check(sx.libc.setns(self.pidns_fd, sx.CLONE_NEWPID), "setns")  # later children: back in ours
        for r, w in pipes.values():
            os.close(w)
            os.set_blocking(r, False)
        try:
            if pid < 0:
                return asdict(Outcome("error", detail=error))
            return self._collect(pid, t0, timeout, lim, nonce, {k: r for k, (r, _) in pipes.items()}, ooms)
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

    def _collect(self, pid: int, t0: float, timeout: float, lim: Limits, nonce: str, fds: dict[str, int],
                 ooms: int) -> dict:  # fmt: skip
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
                    else:  # stdout, stderr and the report pipe all count against the output cap
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
        if self.cgroups and (count := self.cgroups.oom_kills()) > ooms:  # the kernel killed one for memory
            self.ooms = count
            killed = killed or f"memory limit: its processes together exceeded {lim.memory_mb} MiB"
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
        if report == "passed" and not killed.startswith(("output", "memory")):
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
    @staticmethod
    def _tests_beside_candidate(candidate: str, tests: str, namespace: dict) -> None:
        """Run `tests` in this process against `candidate` run in a forked child (eval/sandbox_channel.py).

        The child cannot touch this process: it loses the report pipe before its code runs, this process turns
        non-dumpable (its /proc/<pid>/mem and fds are closed to the same uid; ptrace is filtered), and as pid 1 of
        the namespace it ignores the child's signals. What the tests compare is rebuilt here from plain data."""
        requests, replies = os.pipe(), os.pipe()
        child = os.fork()
        if child == 0:
            os.close(REPORT_FD)
            os.close(requests[1])
            os.close(replies[0])
            code = 0
            try:
                exec(compile(candidate, "<candidate>", "exec"), namespace)
            except BaseException as e:  # the tests' first request gets it as the answer: they fail with it
                sys.__excepthook__(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
                with contextlib.suppress(BaseException):
                    channel.send(replies[1], ["x", type(e).__name__, str(e)[:2000]])
                os._exit(1)
            try:
                channel.serve(requests[0], replies[1], namespace)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(requests[0])
        os.close(replies[1])
        sx.prctl(sx.PR_SET_DUMPABLE, 0)
        client = channel.Client(replies[0], requests[1])
        namespace.update(client.names())
        exec(compile(tests, "<tests>", "exec"), namespace)

    def _program(self, program: str | tuple[str, str], timeout: float, lim: Limits, nonce: str, pipes: dict,
                 host_tmp: str | None):  # fmt: skip
        write, exit_now, getpid = os.write, os._exit, os.getpid  # the program may clobber os.*, sys.*, contextlib
        print_exception = sys.__excepthook__  # what `python program.py` prints with (C, honours tracebacklimit)

        def report(text: str) -> None:
            try:
                write(REPORT_FD, f"{nonce} {text}\n".encode(errors="replace"))
            except BaseException:
                pass

        try:
            if self.cgroups:
                self.cgroups.join()  # first, with everything it will start: limited and accounted as one
            devnull = os.open("/dev/null", os.O_RDONLY)
            for fd, target in ((devnull, 0), (pipes["out"][1], 1), (pipes["err"][1], 2), (pipes["report"][1], 3)):
                os.dup2(fd, target)
            os.closerange(4, 1 << 16)  # control pipe, pidns fd, read ends: only 0-3 stay open
            sx.prctl(sx.PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote dies -> so do we (and our PID namespace)
            os.setsid()
            if self.layers["mount_ns"]:
                sx.unshare(sx.CLONE_NEWNS | sx.CLONE_NEWIPC)  # this run's own mounts, SysV IPC and POSIX queues
                if self.cgroups and self.layers["minimal_root"]:  # bound in for the zygote, gone for the program
                    for d in self.cgroups.dirs:
                        sx.check(sx.libc.umount2(d.encode(), sx.MNT_DETACH), f"umount {d}")
                elif self.layers["read_only"]:
                    sx.read_only_mounts(only=sx.CGROUP_TYPES)  # left writable for the zygote, not for the program
                tmpfs = f"mode=1777,size={lim.tmp_mb}m,nr_inodes={lim.tmp_files}"  # bytes and files both capped
                for target in ("/tmp", "/dev/shm"):
                    sx.mount("tmpfs", target, "tmpfs", sx.MS_NOSUID | sx.MS_NODEV, tmpfs)
                for stashed, path in self.shadowed:  # the interpreter's files that the tmpfs just covered
                    sx.bind(stashed, path)
                    sx.mount(None, path, None, sx.MS_REMOUNT | sx.MS_BIND | sx.MS_RDONLY | sx.MS_NOSUID | sx.MS_NODEV)
                if self.layers["pid_ns"]:
                    sx.mount("proc", "/proc", "proc", sx.MS_NOSUID | sx.MS_NODEV | sx.MS_NOEXEC)
                if self.layers["devpts"]:
                    _own_devpts()
            cwd = host_tmp or "/tmp/sandbox"
            if not host_tmp:
                os.mkdir(cwd, 0o700)
                if self.root:
                    os.chown(cwd, self.uid, self.uid)
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
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)  # from uid 0 to non-zero: every capability is dropped
            elif self.layers["user_ns"]:
                sx.drop_capabilities()  # we are the same uid, but held all capabilities inside the user namespace
            sx.prctl(sx.PR_SET_NO_NEW_PRIVS, 1)
            sx.prctl(sx.PR_SET_DUMPABLE, 1)  # the uid change made /proc/self root-owned; give the program its own back
            sx.prctl(sx.PR_SET_PDEATHSIG, signal.SIGKILL)  # the uid change reset it
            if self.layers["seccomp"]:
                sx.install_seccomp()  # last: from here on the deny-listed system calls fail (sandbox_sys.py)
        except BaseException as e:
            report(f"error setting up the program: {e!r}"[:300])
            exit_now(1)
        me = getpid()
        main = types.ModuleType("__main__")
        main.__builtins__ = builtins
        sys.modules["__main__"], sys.argv = main, ["<program>"]
        status = 1  # the exit status Python itself would give
        try:
            if isinstance(program, str):
                exec(compile(program, "<program>", "exec"), main.__dict__)
            else:  # (candidate, tests): the tests run here, the candidate in a child they reach through a channel
                self._tests_beside_candidate(*program, main.__dict__)
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


def _own_devpts() -> None:
    """A private pseudo-terminal instance for this mount namespace (ptys of its own, none of the host's, at most
    16), with /dev/ptmx pointing into it."""
    sx.mount("devpts", "/dev/pts", "devpts", sx.MS_NOSUID | sx.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,max=16")
    sx.mount("/dev/pts/ptmx", "/dev/ptmx", None, sx.MS_BIND)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


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
    disable = set(sys.argv[2].split(",")) - {""} if len(sys.argv) > 2 else set()
    zygote = _Zygote(ctl_in, ctl_out, uid=int(sys.argv[1]) if len(sys.argv) > 1 else 65534, disable=disable)
    zygote.isolate()
    zygote.serve()


if __name__ == "__main__":
    _zygote_main()
