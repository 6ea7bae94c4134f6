"""The system calls of the sandbox's worker processes (eval/sandbox_zygote.py), through ctypes.

Namespaces (unshare, setns), mounts (tmpfs covers, bind mounts, read-only remounts), prctl flags and capabilities:
the kernel-enforced layers described in eval/sandbox.py. Linux only; every function raises OSError (with errno
and a readable message) when the kernel refuses, so the caller can degrade and record which layer it lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
# statvfs flags that a read-only bind remount must repeat (inside a user namespace they are locked).
KEEP_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
               os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}  # fmt: skip

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    # os.unshare exists only from Python 3.12.
    check(libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    check(libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")


def drop_capabilities() -> None:
    """Clear every capability (used inside a user namespace, where setuid to another uid is impossible)."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    check(libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")  # _LINUX_CAPABILITY_VERSION_3


def interpreter_dirs() -> list[str]:
    """Directories the program's interpreter reads from: the prefixes and every directory on sys.path."""
    dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    return sorted({os.path.realpath(d) for d in dirs + sys.path if d and os.path.isdir(d)})


def expose(paths: list[str]) -> None:
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
        mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        for p, fd in zip(keep, fds, strict=True):
            os.makedirs(p, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            os.close(fd)


CGROUP_TYPES = ("cgroup", "cgroup2")


def read_only_mounts(skip: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> None:
    """Remount the mounts of this namespace read-only (bind remounts change only this namespace's view): every one,
    or those whose filesystem type is not in `skip`, or only those whose type is in `only`."""
    points = [p for _, p, fstype, _ in _mountinfo() if fstype not in skip and (not only or fstype in only)]
    for point in dict.fromkeys(points):
        try:
            flags = os.statvfs(point).f_flag
            keep = sum(ms for st, ms in KEEP_FLAGS.items() if flags & st)
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            if point == "/":
                raise  # the root must be read-only; a stray pseudo filesystem that refuses is tolerated


# ----------------------------------------------------------------------------------------------- syscall filter
# A seccomp filter (classic BPF over struct seccomp_data) installed in the program's process just before its code
# runs: system calls no test program needs and that open a way around the other layers fail with EPERM. Only
# x86_64 numbers are known here; elsewhere the layer is reported unavailable. Calls through the i386 or x32
# ABIs (int 0x80, the x32 bit) kill the process: a filter keyed on x86_64 numbers would not recognise them.
AUDIT_ARCH_X86_64, X32_BIT = 0xC000003E, 0x40000000
DENIED_X86_64 = {
    # another process's memory and file descriptors
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
    # new namespaces (a user namespace regains capabilities, with mounts of its own) and mounts
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442,
    # the kernel keyring, shared by every process of a uid and outliving the run
    "add_key": 248, "request_key": 249, "keyctl": 250,
    # memory that belongs to no process: SysV shared memory, semaphores, queues; anonymous files
    "shmget": 29, "semget": 64, "msgget": 68, "memfd_create": 319,
    # kernel attack surface no test needs
    "perf_event_open": 298, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "name_to_handle_at": 303, "open_by_handle_at": 304,
}  # fmt: skip
CLONE_X86_64, CLONE3_X86_64 = 56, 435
CLONE_NEWUTS, CLONE_NEWCGROUP = 0x04000000, 0x02000000
NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
                   | CLONE_NEWCGROUP)
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000  # SECCOMP_RET_ALLOW, _KILL_PROCESS, _ERRNO | errno
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def seccomp_program() -> bytes:
    """The filter as packed `struct sock_filter`s: deny-listed calls → EPERM; clone with a namespace flag →
    EPERM; clone3 → ENOSYS (its flags sit in memory a filter cannot read; libc then falls back to clone)."""
    import errno
    import struct

    # (code, jump-if-true label, jump-if-false label, k); BPF jumps only forward, by pc-relative offsets
    asm: list[tuple[int, str | None, str | None, int]] = [
        (_LD_ABS, None, None, 4),  # seccomp_data.arch
        (_JEQ, None, "kill", AUDIT_ARCH_X86_64),
        (_LD_ABS, None, None, 0),  # seccomp_data.nr
        (_JGE, "eperm", None, X32_BIT),
        *[(_JEQ, "eperm", None, nr) for nr in sorted(DENIED_X86_64.values())],
        (_JEQ, "enosys", None, CLONE3_X86_64),
        (_JEQ, None, "allow", CLONE_X86_64),
        (_LD_ABS, None, None, 16),  # seccomp_data.args[0], low 32 bits: clone's flags
        (_JSET, "eperm", "allow", NAMESPACE_FLAGS),
    ]
    labels = {"allow": _ALLOW, "eperm": _ERRNO | errno.EPERM, "enosys": _ERRNO | errno.ENOSYS, "kill": _KILL}
    at = {name: len(asm) + i for i, name in enumerate(labels)}  # the return instructions follow the code
    out = []
    for pc, (code, jt, jf, k) in enumerate(asm):
        off = [0 if lab is None else at[lab] - pc - 1 for lab in (jt, jf)]
        assert all(0 <= o <= 255 for o in off)
        out.append(struct.pack("<HBBI", code, off[0], off[1], k))
    out += [struct.pack("<HBBI", _RET, 0, 0, ret) for ret in labels.values()]
    return b"".join(out)


def seccomp_available() -> bool:
    import platform

    return sys.platform == "linux" and platform.machine() == "x86_64"


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_FILTER: list = []  # (buffer, struct sock_fprog): built once per worker, before any fork, and kept alive


def install_seccomp() -> None:
    """Install the filter in this process (needs PR_SET_NO_NEW_PRIVS first, or CAP_SYS_ADMIN); irrevocable.

    The filter is assembled on the first call (the zygote's probe) and reused: in each program's freshly forked
    process assembling it again (ctypes objects, struct packing) cost ~0.5 ms of copy-on-write faults, more than
    the system call itself."""
    if not _FILTER:
        prog = seccomp_program()
        buf = ctypes.create_string_buffer(prog, len(prog))
        _FILTER[:] = [buf, _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))]
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(_FILTER[1]), 0, 0), "seccomp")


# ---------------------------------------------------------------------------------------------------- cgroups
# A per-worker memory + pids cgroup that every run joins (a run's processes, threads, tmpfs pages, SysV and memfd
# memory are then limited and accounted *together*, which rlimits, per process, cannot do). cgroup v2 where its
# memory and pids controllers are delegated to us, else v1 hierarchies; None where neither can be written.


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (\\040 for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mountinfo() -> list[tuple[str, str, str, set[str]]]:
    """(root within the filesystem, mount point, fstype, super options) of every mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            fields, (fstype, _, opts) = pre.split(), post.split()[:3]
            out.append((_unescape(fields[3]), _unescape(fields[4]), fstype, set(opts.split(","))))
    return out


def _own_cgroups() -> dict[str, str]:
    """{controller (or "" for v2): this process's cgroup path} from /proc/self/cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def _under(mount_root: str, mount_point: str, path: str) -> str | None:
    if path != mount_root and not path.startswith(mount_root.rstrip("/") + "/"):
        return None
    return os.path.join(mount_point, os.path.relpath(path, mount_root))


class Cgroups:
    """This worker's cgroup(s): `dirs` (v2: one directory; v1: one per controller, memory then pids)."""

    def __init__(self, version: int, dirs: list[str]):
        self.version, self.dirs = version, dirs
        self._limits: tuple[int, int] | None = None  # the limits last set: most runs repeat them
        self._procs: list[int] = []  # cgroup.procs of each directory, opened once by the worker (see join)

    @classmethod
    def create(cls, name: str) -> Cgroups | None:
        """Make `name` under this process's own cgroups, v2 first; None if the machine does not let us."""
        mounts, own = _mountinfo(), _own_cgroups()
        for root, point, fstype, _ in mounts:  # v2: both controllers must be available to children
            if fstype == "cgroup2" and "" in own and (base := _under(root, point, own[""])):
                try:
                    with open(os.path.join(base, "cgroup.subtree_control")) as f:
                        enabled = set(f.read().split())
                    if not {"memory", "pids"} <= enabled:
                        with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                            f.write("+memory +pids")
                    os.makedirs(os.path.join(base, name), exist_ok=True)
                    return cls(2, [os.path.normpath(os.path.join(base, name))])
                except OSError:
                    break
        dirs = []
        for controller in ("memory", "pids"):
            found = [(r, p) for r, p, fstype, opts in mounts if fstype == "cgroup" and controller in opts]
            base = _under(*found[0], own.get(controller, "/")) if found else None
            try:
                if base is None:
                    raise OSError(f"no cgroup v1 {controller} hierarchy")
                os.makedirs(os.path.join(base, name), exist_ok=True)
                dirs.append(os.path.normpath(os.path.join(base, name)))
            except OSError:
                cls(1, dirs).remove()
                return None
        return cls(1, dirs)

    def _write(self, directory: str, file: str, value: str | int) -> None:
        with open(os.path.join(directory, file), "w") as f:
            f.write(str(value))

    def limit(self, memory_bytes: int, pids: int) -> None:
        """Set the limits the next run gets (while the cgroup is empty); called by the worker before each fork."""
        if not self._procs:  # inherited by every run's process, which joins with one write and then closes them
            self._procs = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for d in self.dirs]
        if self._limits == (memory_bytes, pids):
            return
        self._limits = None  # unknown until every write below succeeded
        if self.version == 2:
            self._write(self.dirs[0], "memory.max", memory_bytes)
            with contextlib.suppress(OSError):  # no swap configured: no file
                self._write(self.dirs[0], "memory.swap.max", 0)
            self._write(self.dirs[0], "pids.max", pids)
            self._limits = (memory_bytes, pids)
            return
        memory, pid_dir = self.dirs
        with contextlib.suppress(OSError):  # memsw must stay >= the limit: lower it after, raise it before
            self._write(memory, "memory.memsw.limit_in_bytes", -1)
        self._write(memory, "memory.limit_in_bytes", memory_bytes)
        with contextlib.suppress(OSError):
            self._write(memory, "memory.memsw.limit_in_bytes", memory_bytes)
        self._write(pid_dir, "pids.max", pids)
        self._limits = (memory_bytes, pids)

    def join(self) -> None:
        """Move the calling process into the cgroup(s) ("0" = the writer, in any PID namespace), through the
        descriptors `limit` opened, and close them: the program must not hold a way to move itself out."""
        for fd in self._procs:
            os.write(fd, b"0")
            os.close(fd)
        self._procs = []

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this cgroup so far."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.dirs[0], name)) as f:
                return int(dict(line.split() for line in f if line.strip()).get("oom_kill", 0))
        except (OSError, ValueError):
            return 0

    def remove(self) -> None:
        for fd in self._procs:
            os.close(fd)
        self._procs = []
        for d in self.dirs:
            with contextlib.suppress(OSError):
                os.rmdir(d)


# ------------------------------------------------------------------------------------------- the program's root
# Instead of a read-only view of the whole host (the project, its checkpoints, other runs' samples, the reference
# solutions inside installed packages, sockets), the worker pivots into a root built from an allowlist: the
# system's binaries and shared libraries, the interpreter and its standard library, device nodes, a minimal /etc.
# Every site-packages/dist-packages directory inside what was allowed is covered by an empty filesystem.
MNT_DETACH, SYS_PIVOT_ROOT_X86_64 = 2, 155
SYSTEM_PATHS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr/bin", "/usr/sbin", "/usr/lib",
                "/usr/lib32", "/usr/lib64", "/usr/libexec", "/usr/local/bin", "/usr/local/lib")  # fmt: skip
DEVICES = ("null", "zero", "full", "random", "urandom")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "localtime", "nsswitch.conf")  # read by the loader and libc, if present
PACKAGE_DIRS = ("site-packages", "dist-packages", "python3*/site-packages", "python3*/dist-packages")


def bind(src: str, dst: str) -> None:
    """Bind-mount `src` (a directory or a file) at `dst`, creating the mount point."""
    if os.path.isdir(src):
        os.makedirs(dst, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, None, MS_BIND | MS_REC)


def interpreter_paths() -> list[str]:
    """The interpreter's own files: its binary directories, its prefix's lib/ (stdlib, libpython), a venv's
    pyvenv.cfg; not any site-packages."""
    stdlib = os.path.dirname(os.__file__)
    paths = {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable)),
             os.path.join(sys.base_prefix, "lib"), os.path.join(sys.base_exec_prefix, "lib"), stdlib,
             os.path.join(stdlib, "lib-dynload")}  # fmt: skip
    cfg = os.path.join(sys.prefix, "pyvenv.cfg")
    if os.path.isfile(cfg):
        paths.add(cfg)
    return sorted(p for p in paths if os.path.exists(p))


def package_dirs(roots: list[str]) -> list[str]:
    """site-packages / dist-packages directories under `roots` (where pip and distributions put them)."""
    import glob

    found = set()
    for r in roots:
        for pattern in PACKAGE_DIRS:
            for sub in ("", "lib/", "local/lib/"):
                found.update(p for p in glob.glob(os.path.join(r, sub + pattern)) if os.path.isdir(p))
    return sorted(found)


def pivot_into_minimal_root(new: str, extra: dict[str, str], etc: dict[str, str]) -> None:
    """Build the root at `new` (an empty, private tmpfs) and pivot_root into it; `extra` = {host path: path in
    the new root} bound as they are (read-write until remounted), `etc` = {file name: content} for /etc."""
    allow = [p for p in SYSTEM_PATHS if os.path.lexists(p)] + interpreter_paths()
    allow = [p for p in allow if not any(p.startswith(q + "/") for q in allow)]  # nested ones come along
    for p in allow:
        if os.path.islink(p) and os.path.dirname(p) == "/":  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(p), new + p)
        elif not os.path.islink(p) or os.path.exists(p):
            bind(os.path.realpath(p) if os.path.islink(p) else p, new + p)
    for p in package_dirs([q for q in allow if os.path.isdir(q)]):
        if os.path.isdir(new + p):
            mount("tmpfs", new + p, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,nr_inodes=1,mode=755")
    for name in DEVICES:
        bind(f"/dev/{name}", f"{new}/dev/{name}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{new}/dev/{name}")
    for d in ("dev/pts", "dev/shm", "tmp", "proc", "etc"):
        os.makedirs(f"{new}/{d}", mode=0o755, exist_ok=True)
    open(f"{new}/dev/ptmx", "a").close()  # a mount point for the run's own devpts
    bind("/proc", f"{new}/proc")  # the zygote's view; each run mounts its own over it
    for name in ETC_FILES:
        if os.path.isfile(f"/etc/{name}"):
            bind(f"/etc/{name}", f"{new}/etc/{name}")
    for name, text in etc.items():
        with open(f"{new}/etc/{name}", "w") as f:
            f.write(text)
    for src, dst in extra.items():
        bind(src, new + dst)
    os.chmod(new, 0o755)
    os.mkdir(f"{new}/.old")
    check(libc.syscall(SYS_PIVOT_ROOT_X86_64, new.encode(), f"{new}/.old".encode()), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", MNT_DETACH), "umount /.old")
    os.rmdir("/.old")
