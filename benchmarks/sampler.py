"""Diffusion sampling speed and quality: the reference sampler vs every faster mode, on the same weights and prompts.

    python benchmarks/sampler.py [--sizes tiny,95m,1.7b] [--batches 1,4] [--rounds 3] [--threads 2] [--quick]

Modes, all with alg="entropy", temperature 0, steps = new tokens (CoDA's evaluation setting: one commit per step):

    exact    fast=False: the reference algorithm, one full forward per step (token-equal to the official code)
    fast     fast=True: reuses a step's forward when it committed nothing (bitwise the reference)
    lean     lean=True, fast=True: the same algorithm through qat/models/lean.py (rotary once, the last layer and
             the head only on the rows read, packed float32 weights); the reference's tokens up to last-bit rounding
    draft    draft=4: lossless draft-and-verify (qat/models/speculative.py), each forward verifies up to 4 steps
             drafted from one step's logits; the reference's tokens; a GPU gain, a CPU loss (4 sequences a forward)
    block    block_length 32 (semi-autoregressive), lean forward. NOT the reference
    prefix   block 32 + prefix KV cache (qat/models/block_cache.py). NOT the reference
    dual     block 32 + dual KV cache. NOT the reference
    dual+t   dual cache + parallel commits above probability 0.9 (Fast-dLLM). NOT the reference

Sizes: `tiny` is the committed trained tiny CoDA (checkpoints/tiny-coda) on prompts cut from held-out code
(pkg:accelerate, never trained on), so its confidences are real and parallel commits happen; `95m` a random
CoDA-shaped model (hidden 768, 12 layers, 12/4 heads of 64, MLP 2304, vocab 32768: 83M layer + 25M head
parameters, the issue's measurement); `1.7b` two layers shaped like CoDA-1.7B's (hidden 2048, 16/8 heads of 128,
MLP 6144) with its 151,936-token head. Random models get distinct random prompts per batch row and a zeroed
head row for the mask id (a trained model never commits it).

Timing: `--rounds` interleaved rounds (qat/latency.interleaved: each round runs every mode once, in a rotated
order), medians; "× exact" is the ratio of medians. "agree" is the fraction of generated tokens equal to
exact's. For `tiny` also: "held-out" the fraction equal to the real continuation of the held-out file, and
"judge" the mean NLL per token of the completion under the committed float tiny Qwen3 (lower is better), the
quality cost of the non-reference modes measured on a model that can be right. Nothing here asserts a threshold
except that fast equals exact (bitwise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere without installing the package

from qat.latency import interleaved  # noqa: E402
from qat.models.sampler import diffusion_generate  # noqa: E402

SHAPES = {
    "95m": dict(vocab_size=32768, hidden_size=768, intermediate_size=2304, num_hidden_layers=12,
                num_attention_heads=12, num_key_value_heads=4, head_dim=64),
    "1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=2,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "quick": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}  # fmt: skip
MODES = {
    "exact": {},
    "fast": dict(fast=True),
    "lean": dict(fast=True, lean=True),
    "draft": dict(draft=4),
    "block": dict(lean=True, block_length=32),
    "prefix": dict(block_length=32, cache="prefix"),
    "dual": dict(block_length=32, cache="dual"),
    "dual+t": dict(block_length=32, cache="dual", threshold=0.9),
}
REFERENCE = {"exact", "fast", "lean", "draft"}
BOUNDS: dict[str, str] = {}  # size -> its flop_bound line


def build(shape: dict[str, int]) -> torch.nn.Module:
    """A random qat.models.coda model (CoDA's network) with mask_token_id = vocab - 1, its head row zeroed."""
    from qat.models.coda import CoDAConfig, CoDAForMaskedDiffusion

    torch.manual_seed(0)
    v = shape["vocab_size"]
    config = CoDAConfig(**shape, max_position_embeddings=4096, mask_token_id=v - 1, pad_token_id=v - 2,
                        bos_token_id=v - 2, eos_token_id=v - 3)  # fmt: skip
    model = CoDAForMaskedDiffusion(config).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.mask_token_id] = 0
    return model


def flop_bound(config, prompt: int, new: int) -> float:
    """Matmul FLOPs of the reference (every layer and the head on all L positions, every step) over those of
    the lean forward (the last layer and the head only on the rows the masked positions read: new − t rows at
    step t): the most any exact algorithm that keeps the reference's per-step forward can gain where matmuls are
    the cost (a CPU in float32)."""
    h, heads, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layer = 2 * h * heads * d + 2 * h * kv * d + 3 * h * config.intermediate_size  # q, o; k, v; the MLP
    head, n, length = config.vocab_size * h, config.num_hidden_layers, prompt + new
    attention = 4 * heads * d * length  # QKᵀ and AV per query row, multiply-adds × 2 / 2
    ref = new * length * (n * (layer + attention) + head)
    lean = sum(length * (n - 1) * (layer + attention) + (new - t) * (layer + attention + head) for t in range(new))
    return ref / lean


def heldout_prompts(tokenizer, batch: int, prompt: int, new: int) -> torch.Tensor:
    """[batch, prompt + new] windows of held-out code (pkg:accelerate), evenly spread over it."""
    from qat import data
    from qat.config import DataConfig

    return data.windows(DataConfig(path="pkg:accelerate", split="all"), tokenizer, prompt + new, batch)


def judge_nll(judge, ids: torch.Tensor, prompt: int) -> float:
    """Mean NLL per generated token under the autoregressive judge, given the prompt."""
    with torch.no_grad():
        logits = judge(input_ids=ids).logits[:, prompt - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, prompt:].flatten()))


def run_size(name: str, batch: int, args) -> list[str]:
    prompt, new = (64, 64) if name == "tiny" else (args.prompt, args.new if name != "1.7b" else 32)
    if args.quick:
        prompt, new = 32, 32
    judge = truth = None
    if name == "tiny":
        from qat.models import load

        model, tok = load(ROOT / "checkpoints" / "tiny-coda")
        judge = load(ROOT / "checkpoints" / "tiny-qwen3")[0]
        windows = heldout_prompts(tok, batch, prompt, new)
        ids, truth = windows[:, :prompt], windows[:, prompt:]
    else:
        model = build(SHAPES["quick" if args.quick else name])
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size - 1, (batch, prompt), generator=gen)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    modes = [m for m in MODES if m in {"exact", "fast", *args.modes.split(",")}]
    outputs: dict[str, torch.Tensor] = {}

    def job(mode: str):
        def go():
            outputs[mode] = diffusion_generate(model, ids, max_new_tokens=new, steps=new, alg="entropy",
                                               **MODES[mode])  # fmt: skip
        return go

    with torch.inference_mode():
        times = interleaved({m: job(m) for m in modes}, rounds=args.rounds, warmup=0)
    exact = outputs["exact"][:, prompt:]
    if not torch.equal(outputs["fast"], outputs["exact"]):
        sys.exit(f"{name}: fast=True differs from exact: a bug")
    lines = []
    BOUNDS[name] = f"{name}, {prompt} + {new}: {flop_bound(model.config, prompt, new):.2f}×"
    for mode in modes:
        got = outputs[mode][:, prompt:]
        agree = float((got == exact).float().mean())
        row = (f"| {name} ({params:.0f}M) | {batch} | {mode}{'' if mode in REFERENCE else ' (not ref.)'} | "
               f"{times[mode].median_ms / 1000:.2f} | {times['exact'].median_ms / times[mode].median_ms:.2f}× | "
               f"{agree:.3f} |")  # fmt: skip
        if truth is not None:
            held = float((got == truth).float().mean())
            row += f" {held:.3f} | {judge_nll(judge, outputs[mode], prompt):.3f} |"
        lines.append(row)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,95m,1.7b")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (random models)")
    ap.add_argument("--new", type=int, default=128, help="new tokens = steps (random models; 32 for 1.7b)")
    ap.add_argument("--modes", default=",".join(MODES), help="modes to run (exact and fast always run: the baseline)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: small shapes, 32 tokens, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    print(f"diffusion sampling, alg entropy, temperature 0, steps = new tokens, {args.threads} thread(s), "
          f"medians of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| model | batch | mode | seconds | × exact | agree | held-out | judge NLL |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.sizes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for line in run_size(name, batch, args):
                print(line, flush=True)
    print("\nFLOP bound of exact decoding (the reference's matmul FLOPs over the lean forward's, `flop_bound`): "
          + "; ".join(BOUNDS.values()))


if __name__ == "__main__":
    main()
