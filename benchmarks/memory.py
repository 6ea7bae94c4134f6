"""Peak training memory: plain fine-tuning vs full QAT vs QAT with a frozen teacher vs LoRA-QAT, one run.

    python benchmarks/memory.py [--steps 3] [--seq 256] [--batch 2] [--layers 14]

What is measured. A random Qwen3-shaped model of ~100M parameters (hidden 768, MLP 2048, 12 query / 4 key-value
heads of 64, --layers layers; the byte-level tokenizer, so the layers are the memory) is written once as a
float32 checkpoint; then each configuration runs --steps steps of the one trainer (`qat.train.main`, the
stdlib corpus, batch --batch × --seq, AdamW), each in its own fresh process, which reports its peak resident
set size (ru_maxrss) — on CPU that is where weights, gradients, optimizer state, teacher and activations live
(on a GPU the same script's configurations would be compared by torch.cuda.max_memory_allocated). Configurations:

    plain        quant.bits=16: the unquantized model fine-tuned (the reference)
    qat          W4 g128, learned (LSQ) scales: full QAT, every weight trained
    qat+teacher  the same with train.kd=0.5 from a frozen float copy (train.kd_teacher=frozen)
    lora-qat     the same W4 grid, weights frozen, LoRA r=16 on every linear (train.lora.r=16)

Targets (issue 12): qat ≤ 1.10 × plain; lora-qat ≤ 0.6 × qat. Peak RSS includes the interpreter and libraries
(~0.5 GB here), the same in every process; the "above start" column subtracts each process's RSS right after
its imports. Nothing here asserts a threshold.

Allocator. With glibc's defaults, freed tensors of a few MB stay in the process heap (its mmap threshold grows
after frees), so peak RSS also counts heap fragmentation, which depends on the order of allocations rather than
on what is alive: measured here, that alone made QAT's peak 1.12 × plain where its live memory is 1.02 ×. By
default every process therefore runs with MALLOC_MMAP_THRESHOLD_=65536 (tensors over 64 KiB are mapped and
returned on free), so RSS tracks live tensors, as torch.cuda.max_memory_allocated does on a GPU; --glibc-default
measures with the allocator untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "plain": ["quant.bits=16"],
    "qat": ["quant.bits=4", "quant.group_size=128", "quant.scales=lsq"],
    "qat+teacher": ["quant.bits=4", "quant.group_size=128", "quant.scales=lsq", "train.kd=0.5",
                    "train.kd_teacher=frozen"],
    "lora-qat": ["quant.bits=4", "quant.group_size=128", "quant.scales=lsq", "train.lora.r=16"],
}  # fmt: skip

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from qat import train
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train.main({argv!r})
print("MEMORY " + json.dumps({{"start_kib": start, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def build(out: Path, layers: int) -> Path:
    import torch

    sys.path.insert(0, str(ROOT))
    from qat.models.tiny import build as build_tiny

    return build_tiny(out, dtype=torch.float32, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_window_layers=layers)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's mmap threshold alone")
    args = ap.parse_args()
    env = dict(os.environ) if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build(Path(tmp) / "model", args.layers)
        common = [f"model.path={ckpt}", "data.path=stdlib", "data.max_docs=40", f"train.steps={args.steps}",
                  f"train.seq_len={args.seq}", f"train.batch_size={args.batch}", "train.lr=1e-5",
                  "train.warmup=0", "train.save_every=0", "train.eval_every=0", "train.quant_stats=false"]  # fmt: skip
        rows = {}
        for name, extra in CONFIGS.items():
            argv = [*common, *extra, f"out_dir={Path(tmp) / name}"]
            p = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv)], capture_output=True,
                               text=True, cwd=ROOT, env=env)  # fmt: skip
            line = next((x for x in p.stdout.splitlines() if x.startswith("MEMORY ")), None)
            if p.returncode or line is None:
                sys.exit(f"{name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            rows[name] = json.loads(line[7:])
            print(f"{name}: peak {rows[name]['peak_kib'] / 2**20:.2f} GiB", flush=True)
    plain, qat = rows["plain"], rows["qat"]
    above = {n: r["peak_kib"] - r["start_kib"] for n, r in rows.items()}
    gib = 2**20  # KiB per GiB
    alloc = "glibc defaults" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=65536"
    print(f"\n~100M-parameter Qwen3-shaped model ({args.layers} layers), {args.steps} steps of "
          f"{args.batch} × {args.seq} tokens; {alloc}")
    print(f"{'config':<13}{'peak GiB':>10}{'above start GiB':>17}{'× plain':>9}{'× qat':>8}")
    for n, r in rows.items():
        ratios = f"{r['peak_kib'] / plain['peak_kib']:>8.2f}×{r['peak_kib'] / qat['peak_kib']:>7.2f}×"
        print(f"{n:<13}{r['peak_kib'] / gib:>10.2f}{above[n] / gib:>17.2f}{ratios}")
    qat_vs_plain, lora_vs_qat = above["qat"] / above["plain"], above["lora-qat"] / above["qat"]
    print(f"(above start: qat {qat_vs_plain:.2f}× plain, lora-qat {lora_vs_qat:.2f}× qat)")

if __name__ == "__main__":
    main()
