"""Diffusion sampling speed: the reference sampler vs fast=True (same tokens) vs block mode (other tokens).

    python benchmarks/sampler.py [--configs 1:128,1:256,4:128] [--new 128] [--prompt 64] [--threads 2] [--quick]

What is measured. `qat.models.sampler.diffusion_generate` with alg="entropy", temperature 0, on a randomly
initialised CoDA-shaped model (qat.models.coda.CoDAForMaskedDiffusion: transformers' Qwen3 made bidirectional),
hidden 768, 12 layers, 12 query / 4 key-value heads of 64, MLP 2304, vocab 32768, untied head: 83M parameters
in the layers and 25M in the head, so the layers dominate a forward as in CoDA-1.7B (1.4B vs 0.3B).
The mask id is the last token and its head row is zeroed, so that the random model never commits it (a
trained one does not either). Each config batch:steps generates `--new` tokens after a fixed random prompt of
`--prompt` tokens (the same prompt repeated over the batch rows would hide batching effects, so each row has
its own), and runs three variants:

    exact   the reference algorithm, one full forward per step
    fast    fast=True: reuses the forward of a step that committed nothing. Asserted to give the same tokens
            as exact (bitwise: a reused forward is the same function of the same input)
    +head   fast=True, masked_head=True: also computes the LM head only for the masked rows. Same logits up
            to last-bit rounding (a matmul over fewer rows may round differently), so tokens can differ where
            two confidences tie within that rounding: its agreement with exact is printed, not asserted
    block   block_length 32 with fast, masked_head and stop_at: NOT the reference algorithm, its tokens differ.
            stop_at stands in for <|im_end|>: a random model has no end of answer, so it is the token the exact
            run generated most often, and generation stops once every row holds it in a finished block

tokens/s = batch × new tokens / wall time of the whole generation (for block mode the tokens filled after an
early stop count too: that is what a server saves). "× exact" is the speedup over exact for the same config;
"agree" is the fraction of generated tokens equal to exact's. Forwards are counted on the decoder. With steps >
new tokens (e.g. 256 for 128) about half of the reference's steps commit nothing, which fast=True skips. One
timed run per variant, after a warmup forward; another job on the machine only adds time. Nothing here
asserts a threshold other than fast == exact.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere without installing the package

from qat.models.sampler import diffusion_generate  # noqa: E402

FULL = dict(vocab_size=32768, hidden_size=768, intermediate_size=2304, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, head_dim=64)  # fmt: skip
QUICK = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # fmt: skip


def build(shape: dict[str, int], device: torch.device) -> torch.nn.Module:
    """A random qat.models.coda model (CoDA's network) with mask_token_id = vocab - 1."""
    from qat.models.coda import CoDAConfig, CoDAForMaskedDiffusion

    torch.manual_seed(0)
    v = shape["vocab_size"]
    config = CoDAConfig(**shape, max_position_embeddings=4096, mask_token_id=v - 1, pad_token_id=v - 2,
                        bos_token_id=v - 2, eos_token_id=v - 3)  # fmt: skip
    model = CoDAForMaskedDiffusion(config).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.mask_token_id] = 0
    return model


def timed(model: torch.nn.Module, calls: list[int], ids: torch.Tensor, **kw) -> tuple[torch.Tensor, float, int]:
    """(output, seconds, decoder forwards) of one generation."""
    calls[0] = 0
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = diffusion_generate(model, ids, alg="entropy", temperature=0.0, **kw)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, calls[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="1:128,1:256,4:128", help="comma-separated batch:steps pairs")
    ap.add_argument("--new", type=int, default=128, help="max_new_tokens")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--block", type=int, default=32, help="block_length of the block-mode run")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2-layer model, 32 tokens, ~30 s")
    args = ap.parse_args()
    shape = FULL
    if args.quick:
        shape, args.configs, args.new, args.prompt, args.block = QUICK, "1:32,1:64,2:32", 32, 32, 8
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(shape, device)
    calls = [0]
    model.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    layers = sum(p.numel() for p in model.model.layers.parameters()) / 1e6
    head = model.lm_head.weight.numel() / 1e6
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape["vocab_size"] - 1, (max(b for b, _ in configs), args.prompt), generator=gen)
    with torch.inference_mode():
        model(input_ids=prompt[:1].to(device))  # warmup: first-call allocations and kernel selection
    print(f"diffusion sampling, alg entropy, temperature 0: {layers:.0f}M layer + {head:.0f}M head parameters, "
          f"prompt {args.prompt}, {args.new} new tokens, {device}, {args.threads} thread(s)\n")  # fmt: skip
    print("| batch | steps | variant | forwards | seconds | tokens/s | × exact | agree |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    summary = []
    for batch, steps in configs:
        ids = prompt[:batch].to(device)
        kw = dict(max_new_tokens=args.new, steps=steps)
        exact, t_exact, f_exact = timed(model, calls, ids, **kw)
        fast, t_fast, f_fast = timed(model, calls, ids, fast=True, **kw)
        if not torch.equal(exact, fast):
            sys.exit(f"fast=True differs from exact in {int((exact != fast).sum())} tokens: a bug")
        head, t_head, f_head = timed(model, calls, ids, fast=True, masked_head=True, **kw)
        gen_tokens = exact[:, args.prompt :]
        stop = int(gen_tokens.flatten().mode().values)
        block, t_block, f_block = timed(model, calls, ids, fast=True, masked_head=True, block_length=args.block,
                                        stop_at=stop, **kw)  # fmt: skip
        agree = {
            k: float((v[:, args.prompt :] == gen_tokens).float().mean()) for k, v in [("head", head), ("block", block)]
        }
        n_tok = batch * args.new
        for name, t, f, a in [
            ("exact", t_exact, f_exact, 1.0),
            ("fast", t_fast, f_fast, 1.0),
            ("fast +head", t_head, f_head, agree["head"]),
            (f"block {args.block}, stop {stop} (not ref.)", t_block, f_block, agree["block"]),
        ]:
            print(f"| {batch} | {steps} | {name} | {f} | {t:.2f} | {n_tok / t:.1f} | {t_exact / t:.2f}× | {a:.3f} |")
        summary.append(
            f"batch {batch}, steps {steps}: fast {t_exact / t_fast:.2f}× exact (identical tokens), "
            f"+head {t_exact / t_head:.2f}× ({agree['head']:.1%} tokens agree), "
            f"block {t_exact / t_block:.2f}× ({agree['block']:.0%} agree; not the reference)"
        )
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
