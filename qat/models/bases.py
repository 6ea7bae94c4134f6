"""The trained tiny bases (`checkpoints/tiny-qwen3`, `checkpoints/tiny-coda`): how they are made, end to end.

    python -m qat.models.bases init out=checkpoints/init/tiny-qwen3            # tokenizer + random Qwen3
    python qat/train.py recipe=tiny_qwen3_base                                 # pretrain (quant.bits=16)
    python -m qat.models.bases publish src=checkpoints/tiny_qwen3_base/final out=checkpoints/tiny-qwen3
    python qat/train.py recipe=tiny_coda_base                                  # adapt that Qwen3 into CoDA
    python -m qat.models.bases publish src=checkpoints/tiny_coda_base/final out=checkpoints/tiny-coda

`init` trains the byte-level BPE (qat/models/bpe.py, 8,192 tokens) on the stdlib's train split and writes a
randomly initialised Qwen3 of BASE_SIZES with it. The recipes do the rest with the one trainer: the Qwen3 is
pretrained with next-token CE on the stdlib train split, and the CoDA is *adapted* from it (`model.family=coda`
on a Qwen3 checkpoint: the same weights made bidirectional, `qat.models.coda.from_qwen3`) with the
masked-diffusion objective, as CoDA itself was made from Qwen3. Validation is the stdlib's validation split.

`publish` stores a finished run's float artifact in bf16 (both bases fit the 25 MB budget) in the family's
released format: transformers' Qwen3 layout, or CoDA's released config.json field set and tensor names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from qat.config import DataConfig, RecipeError, exit_on_error
from qat.models.tiny import qwen3_config

# ~6.8M parameters (2.1M of them the tied 8k × 256 embedding); every linear's in_features (256, 768) is a
# multiple of 128, so each group size up to 128 applies.
BASE_SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, rope_theta=10000.0)  # fmt: skip


def init(out: str | Path, vocab_size: int = 8192, seed: int = 0) -> Path:
    """Tokenizer trained on the stdlib train split + a random Qwen3 of BASE_SIZES (float32), in `out`."""
    from qat.data import files
    from qat.models.bpe import train_bpe

    out = Path(out)
    paths = files(DataConfig(path="stdlib", split="train"))
    tok = train_bpe((p.read_text(encoding="utf-8", errors="replace") for p in paths), vocab_size)
    tok.save_pretrained(out)
    sizes = {k: v for k, v in BASE_SIZES.items() if k != "rope_theta"}
    config = qwen3_config(len(tok), **sizes, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.eos_token_id)  # fmt: skip
    config.rope_parameters = {"rope_type": "default", "rope_theta": BASE_SIZES["rope_theta"]}
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(out)
    return out


def publish(src: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A finished float run (`<out_dir>/final`) as a released-format checkpoint in `dtype`."""
    from qat.models import load
    from qat.models.coda import CoDAForMaskedDiffusion, released_config, save_released
    from qat.modules import QuantizedLinear

    model, tok = load(src)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise RecipeError(f"{src} is quantized; a base is published from a float run (quant.bits=16)")
    model = model.to(dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, CoDAForMaskedDiffusion):
        save_released(model, out, released_config(model.config))
    else:
        model.config.use_cache = True
        model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    args = list(sys.argv[1:] if argv is None else argv)
    with exit_on_error(FileNotFoundError):
        if not args or args[0] not in ("init", "publish"):
            raise RecipeError("usage: python -m qat.models.bases init out=DIR | publish src=DIR out=DIR")
        opts = dict(a.split("=", 1) for a in args[1:])
        if "out" not in opts or (args[0] == "publish" and "src" not in opts):
            raise RecipeError(f"{args[0]} needs out=DIR" + (" and src=DIR" if args[0] == "publish" else ""))
        if args[0] == "publish" and not Path(opts["src"]).is_dir():
            raise FileNotFoundError(f"src={opts['src']}: no such directory")
    if args[0] == "init":
        path = init(opts["out"], int(opts.get("vocab_size", 8192)), int(opts.get("seed", 0)))
    else:
        path = publish(opts["src"], opts["out"])
    print(path)
    return path


if __name__ == "__main__":
    main()
