"""Training-step cost of fake quantization: ours (qat.FakeQuantLinear) vs the plain model vs torchao QAT.

    python benchmarks/fake_quant_overhead.py [--sizes tiny,25m,100m] [--steps N] [--rounds R] [--quick]

What is measured. One training step = forward to logits, next-token cross-entropy, backward, AdamW step
(lr 1e-5), on one fixed batch of 4 × 128 random token ids, for randomly initialised Qwen3-shaped models:

    tiny   qat.models.tiny.qwen3_config defaults (hidden 128, 2 layers), vocab 260
    25m    hidden 512, 7 layers, vocab 8192     100m   hidden 768, 14 layers, vocab 16384

(every linear's in_features a multiple of 128, tied embeddings), in four variants:

    plain      the float model
    ours       qat.swap.prepare, W4 g128 symmetric, scales="static" (RTN scales fixed at init)
    ours-lsq   the same with scales="lsq" (scales are Parameters, trained by AdamW too)
    torchao    torchao's QATConfig + IntxFakeQuantizeConfig(int4, group 128, symmetric) on the same
               linears (embeddings and lm_head stay float in every variant)

How. Each (size, variant) runs in a fresh subprocess (`--worker`, JSON on stdout) so that peak memory is
that variant's alone. The model is built with the same seed in every variant, then 2 warmup steps and N
timed steps; a round's time is the median step. Variants are interleaved over R rounds (plain, ours,
ours-lsq, torchao, plain, ...) and each variant keeps its smallest round median: load from other jobs on a
shared machine only ever adds time. Peak memory is, on CPU, the peak RSS minus the RSS right after the
imports (what model + optimizer + steps cost); on CUDA, torch.cuda.max_memory_allocated. It is the largest
over rounds. On CUDA the step runs under bf16 autocast; on CPU in float32 with torch.set_num_threads(cores).
CPU RSS also counts glibc heap fragmentation: many freed weight-sized temporaries can leave the heap larger
than the live tensors ever were. `MALLOC_MMAP_THRESHOLD_=131072` in the environment (the workers inherit it)
makes RSS track live tensors more closely, at some cost in step time; compare memory runs like with like.

Reading the ratios. "× plain" is variant / plain for the same size: time 1.10× means fake quant adds 10%
to a training step; memory 1.05× means 5% more peak memory. The summary's ours/torchao < 1 means ours is
faster. The fake-quant cost grows with the weights while the rest of the step grows with the tokens, so on
a small batch like this one the ratios are pessimistic compared to a real run. Nothing here asserts a
threshold: it only prints.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere without installing the package

VARIANTS = ["plain", "ours", "ours-lsq", "torchao"]
SIZES: dict[str, tuple[int, dict[str, int]]] = {  # name → (vocab, qwen3_config overrides)
    "tiny": (260, {}),
    "25m": (8192, dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=7,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=64)),
    "100m": (16384, dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14,
                         num_attention_heads=12, num_key_value_heads=4, head_dim=64)),
}  # fmt: skip
BATCH, SEQ, WARMUP = 4, 128, 2


def rss_mib() -> float:
    """Current resident set size (Linux /proc; falls back to the peak so far elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mib()


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def worker(size: str, variant: str, steps: int, threads: int) -> dict[str, Any]:
    """One variant of one size in this (fresh) process; returns the median step time and peak memory."""
    # Every import happens before the baseline RSS, so import cost never counts as step memory.
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import Qwen3ForCausalLM

    from qat.config import QuantConfig
    from qat.models.tiny import qwen3_config
    from qat.swap import prepare, skipped

    if variant == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    base = rss_mib()

    vocab, overrides = SIZES[size]
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_config(vocab, **overrides)).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    scales = "lsq" if variant == "ours-lsq" else "static"
    cfg = QuantConfig(bits=4, group_size=128, symmetric=True, scales=scales)
    if variant.startswith("ours"):
        prepare(model, cfg)
    elif variant == "torchao":
        wcfg = IntxFakeQuantizeConfig(torch.int4, group_size=128, is_symmetric=True)
        # The same linears ours quantizes: nn.Linear not matching the skip patterns (lm_head, embeddings).
        keep = lambda m, fqn: type(m) is nn.Linear and not skipped(fqn, list(cfg.skip))
        quantize_(model, QATConfig(weight_config=wcfg, step="prepare"), filter_fn=keep)
    n_fq = sum(1 for m in model.modules() if type(m) is not nn.Linear and isinstance(m, nn.Linear))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1234)  # the same batch in every variant, independent of the model
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen).to(dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(WARMUP + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()  # CUDA runs asynchronously: time the work, not its launch
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib() - base
    return dict(time=statistics.median(times), peak=peak, params=n_params, fake_quant=n_fq, device=str(dev))


def run_worker(size: str, variant: str, steps: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--sizes", size, "--variant", variant]
    cmd += ["--steps", str(steps), "--threads", str(threads)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"worker {size}/{variant} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])  # libraries may print above; the result is last


def report(size: str, res: dict[str, dict[str, Any]]) -> str:
    """Markdown table for one size; returns its summary line."""
    r0 = res["plain"]
    n_fq, n_tao = res["ours"]["fake_quant"], res["torchao"]["fake_quant"]
    print(f"\n### {size}: {r0['params'] / 1e6:.2f}M parameters, {n_fq} fake-quant linears (torchao {n_tao}), "
          f"batch {BATCH}×{SEQ}, {r0['device']}\n")  # fmt: skip
    print("| variant | step s | × plain | peak MiB | × plain |\n|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        t, m = res[v]["time"], res[v]["peak"]
        print(f"| {v} | {t:.4f} | {t / r0['time']:.2f}× | {m:.0f} | {m / r0['peak']:.2f}× |")
    t, t_tao, m = res["ours"]["time"], res["torchao"]["time"], res["ours"]["peak"]
    return (f"{size}: ours/plain time {t / r0['time']:.2f}×, ours/torchao {t / t_tao:.2f}×, "
            f"ours/plain memory {m / r0['peak']:.2f}×")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,25m,100m", help="comma-separated subset of " + ",".join(SIZES))
    ap.add_argument("--steps", type=int, help="timed steps per round (default 20 tiny, 5 others)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each variant keeps its best")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ap.add_argument("--threads", type=int, default=cores, help="torch.set_num_threads (default: cores)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny only, 3 steps, 1 round")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.sizes, args.variant, args.steps, args.threads)))
        return
    if args.quick:
        args.sizes, args.steps, args.rounds = "tiny", args.steps or 3, 1
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        ap.error(f"unknown sizes {unknown}; have {list(SIZES)}")

    print(f"fake-quant step overhead, W4 g128 symmetric: {args.rounds} round(s), {args.threads} thread(s)")
    summary = []
    for size in sizes:
        steps = args.steps or (20 if size == "tiny" else 5)
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):
            for v in VARIANTS:
                r = run_worker(size, v, steps, args.threads)
                if v in best:  # fastest round median (noise only adds time); largest peak (conservative)
                    r = dict(r, time=min(r["time"], best[v]["time"]), peak=max(r["peak"], best[v]["peak"]))
                best[v] = r
        summary.append(report(size, best))
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
