"""The system calls of the sandbox's worker processes (eval/sandbox_zygote.py), through ctypes.

Namespaces (unshare, setns), mounts (tmpfs covers, bind mounts, read-only remounts), prctl flags and capabilities:
the kernel-enforced layers described in eval/sandbox.py. Linux only; every function raises OSError (with errno
and a readable message) when the kernel refuses, so the caller can degrade and record which layer it lost.
"""

from __future__ import annotations

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


def read_only_mounts() -> None:
    """Remount every mount of this namespace read-only (bind remounts change only this namespace's view)."""
    with open("/proc/self/mountinfo") as f:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]
    for point in dict.fromkeys(points):
        try:
            flags = os.statvfs(point).f_flag
            keep = sum(ms for st, ms in KEEP_FLAGS.items() if flags & st)
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            if point == "/":
                raise  # the root must be read-only; a stray pseudo filesystem that refuses is tolerated
