"""Evaluation of checkpoints on code: HumanEval / MBPP pass@k and held-out loss.

tasks     problems, prompts (completion and instruct formats) and the exact programs that decide pass/fail
sandbox   runs untrusted programs isolated by the OS (namespaces, rlimits, unprivileged uid) in warm workers: the
          pool and the verdicts (sandbox.py), the worker process (sandbox_zygote.py), its system calls (sandbox_sys.py)
run       generate + execute + pass@k for one checkpoint: `python -m eval.run checkpoint=DIR ...`
ablate    the PTQ-vs-QAT grid over bits x methods x families -> report.md, pareto.png
heldout   held-out loss of a checkpoint on any Python code (the CPU-scale quality measure)
"""
