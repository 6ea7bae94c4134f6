"""Tiny random base models in the exact released formats, for CPU runs, tests and CI.

    python -m qat.models.tiny out=checkpoints/tiny-qwen3 [seed=0]

writes a randomly initialised Qwen3 checkpoint (2 layers, hidden 128, every linear's in_features a
multiple of 128 so the real W4 g128 recipe applies unchanged) with a byte-level tokenizer: the 256 byte
symbols and no merges (nothing to train, nothing to download), plus Qwen's special tokens. It learns
nothing; it exercises every code path of a real checkpoint in well under a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte used by byte-level BPE (GPT-2's bytes_to_unicode), by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {ch: b for b, ch in enumerate(_byte_symbols())}  # token id = byte value
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip


def qwen3_config(vocab_size: int, **overrides) -> Qwen3Config:
    kw = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=256, pad_token_id=256, bos_token_id=256,
    )  # fmt: skip
    kw.update(overrides)
    return Qwen3Config(**kw)


def build(out: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides) -> Path:
    """Write the tiny Qwen3 checkpoint + tokenizer to `out`."""
    out = Path(out)
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(len(tok), **overrides)).to(dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    print(build(args.get("out", "checkpoints/tiny-qwen3"), seed=int(args.get("seed", 0))))
