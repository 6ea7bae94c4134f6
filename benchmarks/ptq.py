"""PTQ methods side by side: time and output error of RTN, GPTQ and AWQ at 4/3/2 bits, AR vs diffusion.

    python benchmarks/ptq.py [--bits 4,3,2] [--methods rtn,gptq,awq] [--families qwen3,coda] [--quick]

What is measured. A randomly initialised Qwen3-shaped model of ~100M parameters in its layers (hidden 768,
14 layers, MLP 2048, 12 query / 4 key-value heads of 64; the byte-level tokenizer of the tiny models, so the
vocabulary is 260 and the layers are the whole cost) and its CoDA twin (the same weights, bidirectional:
qat.models.coda). For each family, method and bit width a fresh copy of the float model goes through
`qat.ptq.pipeline.quantize_model` exactly as `train.steps=0` runs it: W{b} g128 symmetric, calibration on
--samples windows of --seq tokens of this Python's standard library (noised with the mask-ratio grid for CoDA,
i.e. diffusion-aware calibration), sequential layer by layer. Columns:

    seconds      wall time of quantize_model (calibration forwards, Hessians/searches, solves, the swap)
    layer err    mean over layers of the relative error of each layer's contribution, ‖f_q(h) − f(h)‖² /
                 ‖f(h) − h‖², on the calibration inputs that layer sees
    × RTN        mean over layers of (method's layer error / RTN's on the same inputs): below 1 = better
    logits err   end to end: ‖logits_q − logits‖² / ‖logits‖² on held-out windows (the stdlib's email package,
                 never in the calibration files; noised the same way for CoDA): the whole network's error

The layer errors are in-sample (measured on the calibration inputs GPTQ fitted), the logits error is not.
Random weights have none of the outlier channels of trained LLMs, so AWQ's gains here understate real ones,
and absolute errors mean little; the ratios between methods on the same model are the point. On a shared
2-core machine the seconds are noisy (±30 %); nothing here asserts a threshold.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere without installing the package

from qat.config import load_recipe  # noqa: E402
from qat.models.coda import CoDAConfig, CoDAForMaskedDiffusion  # noqa: E402
from qat.models.tiny import byte_tokenizer, qwen3_config  # noqa: E402
from qat.ptq.calibrate import calibration_ids  # noqa: E402
from qat.ptq.pipeline import quantize_model  # noqa: E402

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64)  # fmt: skip
QUICK = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)  # fmt: skip


def build(family: str, shape: dict, tok) -> torch.nn.Module:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    base = Qwen3ForCausalLM(qwen3_config(len(tok), tie_word_embeddings=False, **shape)).eval()
    if family == "qwen3":
        return base
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   mask_token_id=tok.mask_token_id)  # fmt: skip
    twin = CoDAForMaskedDiffusion(CoDAConfig(vocab_size=len(tok), **shape, **special)).eval()
    twin.load_state_dict(base.state_dict())
    return twin


def recipe(family: str, method: str, bits: int, args) -> object:
    return load_recipe([
        f"model.family={family}", f"quant.init={method}", f"quant.bits={bits}", "data.path=stdlib",
        f"data.max_docs={args.docs}", f"quant.calib_samples={args.samples}", f"quant.calib_seq_len={args.seq}",
        f"quant.calib_batch={args.batch}",
    ])  # fmt: skip


def held_out(family: str, model, tok, args) -> torch.Tensor:
    """Windows from files calibration never sees (the stdlib's email package; calibration takes the first
    --docs files in sorted order), noised like calibration for CoDA."""
    from qat.data import stdlib_dir

    r = recipe(family, "rtn", 4, args)
    r.data.path, r.data.max_docs = str(stdlib_dir() / "email"), 0
    return calibration_ids(r, tok, model.config)[: max(2, args.samples // 4)]


def logits_error(model, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    return float((out - reference).pow(2).sum() / reference.pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--families", default="qwen3,coda")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq", type=int, default=256, help="tokens per window")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--docs", type=int, default=60, help="stdlib files for calibration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2-layer 256-wide model, 4 windows of 64: a smoke test")
    args = ap.parse_args()
    shape = SHAPE
    if args.quick:
        shape, args.samples, args.seq, args.docs = QUICK, 8, 64, 20
    torch.set_num_threads(args.threads)
    tok = byte_tokenizer(eos="<|im_end|>")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # tokenize/pack bars would interleave with the table
    print("| family | bits | method | seconds | layer err | × RTN | logits err |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for family in args.families.split(","):
        model = build(family, shape, tok)
        ids = held_out(family, model, tok, args)
        with torch.no_grad():
            reference = model(input_ids=ids).logits.float()
        for bits in (int(b) for b in args.bits.split(",")):
            for method in args.methods.split(","):
                m = copy.deepcopy(model)
                r = recipe(family, method, bits, args)
                t0 = time.perf_counter()
                result = quantize_model(m, tok, r, progress=False, report=True)
                seconds = time.perf_counter() - t0
                err = statistics.mean(x.error for x in result.layers)
                ratio = statistics.mean(x.error / x.rtn_error for x in result.layers)
                print(f"| {family} | {bits} | {method} | {seconds:.1f} | {err:.3e} | {ratio:.3f} | "
                      f"{logits_error(m, reference, ids):.3e} |", flush=True)  # fmt: skip
                del m


if __name__ == "__main__":
    main()
