"""Bytes on disk of the packed artifact vs the same model in bf16, at the real Qwen3-1.7B shapes.

    python benchmarks/artifact_size.py [--bits 4] [--group-size 128] [--layers 28]

Builds a randomly initialised Qwen3 with Qwen3-1.7B's configuration (hidden 2048, 28 layers, intermediate
6144, 16/8 heads of 128, vocab 151936, tied embeddings) in bf16, writes it once with save_pretrained (the
bf16 baseline) and once as our artifact (prepare → convert → save_artifact), and prints both sizes and
their ratio. Sizes do not depend on the weight values, so random weights measure the real thing.
`--layers` shrinks the depth for a quick run (the embedding then weighs more in the ratio).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from qat.config import QuantConfig  # noqa: E402
from qat.export import WEIGHTS_FILE, save_artifact  # noqa: E402
from qat.swap import convert, prepare  # noqa: E402


def qwen3_1p7b(layers: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=28)
    a = ap.parse_args()
    torch.manual_seed(0)
    tic = time.perf_counter()
    model = Qwen3ForCausalLM(qwen3_1p7b(a.layers)).to(torch.bfloat16).eval()
    n = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(Path(d) / "bf16")
        bf16 = sum(p.stat().st_size for p in (Path(d) / "bf16").glob("*.safetensors"))
        with torch.no_grad():
            convert(prepare(model, QuantConfig(bits=a.bits, group_size=a.group_size)))
        save_artifact(model, None, None, Path(d) / "q")
        packed = (Path(d) / "q" / WEIGHTS_FILE).stat().st_size
    print(f"Qwen3-1.7B shapes, {a.layers} layers, {n / 1e9:.3f}B params, W{a.bits} g{a.group_size}")
    print("| artifact | bytes | GiB | × bf16 |\n|---|---:|---:|---:|")
    print(f"| bf16 save_pretrained | {bf16} | {bf16 / 2**30:.3f} | 1.000 |")
    print(f"| packed W{a.bits} (embeddings bf16) | {packed} | {packed / 2**30:.3f} | {packed / bf16:.3f} |")
    print(f"({time.perf_counter() - tic:.0f} s)")


if __name__ == "__main__":
    main()
