"""Micro random models in the exact released formats, for tests and CI (`checkpoints/micro-{qwen3,coda}`).

    python -m qat.models.tiny out=checkpoints/micro-qwen3 [family=qwen3|coda] [seed=0]

(The *trained* tiny bases, `checkpoints/tiny-{qwen3,coda}`, are made by qat/models/bases.py.)

writes a randomly initialised checkpoint (2 layers, hidden 128, every linear's in_features a multiple of
128 so the real W4 g128 recipes apply unchanged) with a byte-level tokenizer: the 256 byte symbols and no
merges (nothing to train, nothing to download), plus Qwen's special tokens (<|endoftext|> 256,
<|im_start|> 257, <|im_end|> 258, <|mask|> 259) and a ChatML chat template. It learns nothing; it
exercises every code path of a real checkpoint in well under a second.

`family=coda` writes CoDA's released format, not what `save_pretrained` would write: the real config.json's
field set (`model_type: "CoDA"`, `rope_theta`, `rope_scaling: null`, the remote-code `auto_map`, the training
keys, no `tie_word_embeddings`) with small sizes, and a safetensors file, optionally sharded with an index,
holding the reference's key names including a separate `lm_head.weight`. `build_coda(tokenizer_dir=...)` uses
real tokenizer files instead (then the vocabulary is the real 151936).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
# ChatML as Qwen3 renders it with enable_thinking=False: the final assistant turn (or the generation prompt)
# opens with an empty think block.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' and loop.last -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte used by byte-level BPE (GPT-2's bytes_to_unicode), by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_tokenizer(eos: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    vocab = {ch: b for b, ch in enumerate(_byte_symbols())}  # token id = byte value
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=eos, pad_token="<|endoftext|>", mask_token="<|mask|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
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


TINY_SIZES = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_window_layers=2, max_position_embeddings=4096)  # fmt: skip


def build_coda(
    out: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, tokenizer_dir: str | Path | None = None,
    shards: int = 1, tie: bool = False, **overrides,
) -> Path:  # fmt: skip
    """Write a tiny random CoDA checkpoint in the released format to `out` (see the module docstring).

    tokenizer_dir: copy real tokenizer files from there (vocab 151936, the real special ids) instead of the
    byte-level one; shards > 1: split the weights over that many files plus model.safetensors.index.json;
    tie: leave `lm_head.weight` out of the files (the loader must then tie it to the embeddings)."""
    from qat.models.coda import RELEASED_CONFIG, CoDAConfig, CoDAForMaskedDiffusion, save_released

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = {**RELEASED_CONFIG, **TINY_SIZES}
    if tokenizer_dir is None:
        tok = byte_tokenizer(eos="<|im_end|>")
        tok.save_pretrained(out)
        # the released config leaves bos/eos to the class defaults (151643/151645), outside this vocabulary
        fields.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id,
                      bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    else:
        for f in Path(tokenizer_dir).iterdir():
            if f.name not in ("config.json", "generation_config.json", "README.md") and f.is_file():
                shutil.copy(f, out / f.name)
    fields.update(overrides, torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    torch.manual_seed(seed)
    model = CoDAForMaskedDiffusion(CoDAConfig.from_pretrained(out)).to(dtype)
    return save_released(model, out, fields, shards=shards, tie=tie)


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    family = args.get("family", "qwen3")
    builder = {"qwen3": build, "coda": build_coda}[family]
    print(builder(args.get("out", f"checkpoints/micro-{family}"), seed=int(args.get("seed", 0))))
