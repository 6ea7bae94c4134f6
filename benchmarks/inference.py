"""Quantized inference: float32 and bfloat16 vs int8 and int4 weight-only, on 1.7B-shaped decoder layers.

    python benchmarks/inference.py [--layers 2] [--context 256] [--window 512] [--rounds 10] [--threads 2]

What is measured, side by side in one run (qat/latency.py: a warm-up call each, then interleaved rounds; median
and range):

    (a) decode    one autoregressive decode step (one token, KV cache of --context tokens) through --layers
                  decoder layers shaped like Qwen3-1.7B / CoDA-1.7B (hidden 2048, MLP 6144, 16 query / 8 key-value
                  heads of 128; a 1k vocabulary so the layers are the cost)
    (b) denoise   one diffusion denoising step over a --window-token sequence through the same layers as CoDA
                  (bidirectional: every position, every step)
    (c) generate  128 new tokens, greedy, with the whole committed tiny Qwen3 (checkpoints/tiny-qwen3, 6.8M)

Variants: `fp32` and `bf16` float models; `int8` (W8 per-channel symmetric) and `int4` (W4 g128 symmetric), RTN
weights converted to QuantizedLinear with bfloat16 activations, their paths chosen automatically by measurement
(qat/kernels.py: the CPU int4 tinygemm / int8 weight-only kernels where faster for the number of tokens, else
the dequantized weight cached once, e.g. after a prompt's prefill); `int4-lean` never keeps a dense copy
(dequantizes per call where the kernel loses). The path each took in its last call is printed. `layers MiB` =
bytes the decoder layers' tensors hold in memory after the runs (kernel layouts and dense caches included; the
embedding and head, float in every variant, left out), × = bf16's over the variant's. Ratios are bf16's median time
over the variant's (higher = faster). Shared 2-core machine: expect ±10 % between runs; nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere without installing the package

from qat import kernels, latency  # noqa: E402
from qat.config import QuantConfig  # noqa: E402
from qat.modules import QuantizedLinear, cast_floats  # noqa: E402
from qat.swap import convert, prepare  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
GRIDS = {"int8": QuantConfig(bits=8, group_size=-1, symmetric=True, skip=["lm_head", "*embed*"]),
         "int4": QuantConfig(bits=4, group_size=128, symmetric=True, skip=["lm_head", "*embed*"])}  # fmt: skip


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """fp32, bf16, and the int8/int4 conversions with bfloat16 activations."""
    out = {"fp32": model.float().eval(), "bf16": copy.deepcopy(model).to(torch.bfloat16).eval()}
    for name, cfg in GRIDS.items():
        q = convert(prepare(copy.deepcopy(model).float(), cfg))
        cast_floats(q, torch.bfloat16)
        out[name] = q.eval()
    lean = copy.deepcopy(out["int4"])  # never a dense copy: dequantize per call where the kernel loses
    for m in lean.modules():
        if isinstance(m, QuantizedLinear):
            m.path = "lean"
    out["int4-lean"] = lean
    return out


def layers_model(family: str, n_layers: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qat.models.coda import CoDAConfig, CoDAForMaskedDiffusion

    torch.manual_seed(0)
    common = dict(vocab_size=1024, num_hidden_layers=n_layers, tie_word_embeddings=False, **SHAPE)
    if family == "coda":
        return CoDAForMaskedDiffusion(CoDAConfig(**common, pad_token_id=0, bos_token_id=0, eos_token_id=1,
                                                 mask_token_id=2))  # fmt: skip
    return Qwen3ForCausalLM(Qwen3Config(**common))


def layer_bytes(model: torch.nn.Module) -> int:
    return latency.weight_bytes(model.model.layers)


def table(title: str, models: dict, timings: dict) -> None:
    bf16_t, bf16_b = timings["bf16"].median_ms, layer_bytes(models["bf16"])
    print(f"\n{title}")
    print(f"{'variant':<10}{'ms':>10}{'range':>20}{'× bf16 speed':>14}{'layers MiB':>12}{'× smaller':>11}  path")
    for name, m in models.items():
        t, b = timings[name], layer_bytes(m)
        rng = f"[{t.min_ms:.2f}, {t.max_ms:.2f}]"
        print(f"{name:<10}{t.median_ms:>10.2f}{rng:>20}{bf16_t / t.median_ms:>13.2f}×{b / 2**20:>12.1f}"
              f"{bf16_b / b:>10.2f}×  {latency.label(m)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated scenarios to skip: decode,denoise,generate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(args.skip.split(",")) - {""}
    kernels.forget()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.layers} layers of hidden 2048 / MLP 6144")

    if "decode" not in skip:
        models = variants(layers_model("qwen3", args.layers))
        steps = {n: latency.decode_step(m, context=args.context) for n, m in models.items()}
        table(f"(a) decode step, KV cache of {args.context} tokens", models, latency.interleaved(steps, args.rounds))
        del models, steps
    if "denoise" not in skip:
        models = variants(layers_model("coda", args.layers))
        steps = {n: latency.denoise_step(m, window=args.window) for n, m in models.items()}
        rounds = max(3, args.rounds // 2)
        table(f"(b) denoising step over {args.window} tokens (CoDA)", models, latency.interleaved(steps, rounds))
        del models, steps
    if "generate" not in skip:
        from qat.models import load

        base, tok = load(ROOT / "checkpoints" / "tiny-qwen3")
        models = variants(base)
        prompt = tok("def fibonacci(n):\n", return_tensors="pt").input_ids

        def generate(m):
            return lambda: m.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                                      pad_token_id=tok.pad_token_id)  # fmt: skip

        steps = {n: generate(m) for n, m in models.items()}
        table("(c) generate 128 tokens, greedy, tiny Qwen3 (6.8M)", models, latency.interleaved(steps, args.rounds))
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    print("kernel decisions (device, dtype, out, in, bits, group, symmetric, token bucket) -> path:")
    for key, path in sorted(kernels.decisions().items(), key=str):
        print(f"  {key} -> {path}")


if __name__ == "__main__":
    main()
