"""Checkpoint formats other engines load, written from our artifacts and read back by our loader.

    python -m qat.export checkpoint=DIR format=compressed-tensors|gptq out=DIR2

    compressed-tensors   `pack-quantized`, what llm-compressor writes (qat/formats/ct.py): transformers loads it
                         with the `compressed-tensors` package (decompressing to dense weights on CPU), vLLM
                         serves it. Any width 1–8, symmetric or not, groups or per-channel, per-layer settings.
    gptq                 the GPTQ v1 layout (qweight/qzeros/scales/g_idx + quantize_config.json; qat/formats/gptq.py)
                         for symmetric 2/4/8-bit grids, loaded by GPTQ backends (GPTQModel, vLLM).

Both keep everything that is not a quantized linear (embeddings, norms, a skipped lm_head) as it is in the artifact,
in the model's dtype, and the model's own config.json plus `quantization_config`; a CoDA artifact exports to the
same tensor layout with CoDA's config (no engine serves CoDA yet; `qat.models.load` reads either format back into
QuantizedLinear modules, which is also how exports are tested where no engine installs).

Shared here: walking an artifact's quantized linears (`Linear` records), the unquantized tensors, and the
skeleton our reader fills.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qat.modules import QuantizedLinear, cast_floats

FORMATS = ("compressed-tensors", "gptq")
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Linear:
    """One quantized linear of an artifact: codes [out, in] (signed for symmetric grids, else unsigned), scale
    [out, groups] float32, integer zero point [out, groups] (asymmetric only), bias."""

    name: str
    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group_size: int  # -1: one group per row
    symmetric: bool
    bias: Tensor | None

    @property
    def unsigned(self) -> Tensor:
        """Codes shifted to [0, 2^bits): what both formats pack."""
        return (self.codes.to(torch.int32) + (1 << (self.bits - 1) if self.symmetric else 0)).contiguous()


def linears(model: nn.Module) -> list[Linear]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            if m.offset is not None:
                raise ValueError(f"{name}: a float offset per group (a QA-LoRA merge, train.lora.merge=group) "
                                 "is not a grid either format stores; export a train.lora.merge=requant run")
            zero = None
            if m.zero_point is not None:
                zero = m.zero_point.round()
                if not torch.equal(zero, m.zero_point) or zero.min() < 0 or zero.max() >= 1 << m.bits:
                    raise ValueError(f"{name}: a zero point is not an integer in [0, {(1 << m.bits) - 1}] (learned "
                                     "zero points may leave the grid); neither format can store it")  # fmt: skip
                zero = zero.to(torch.int32)
            bias = None if m.bias is None else m.bias.detach()
            out.append(Linear(name, m.codes(), m.scale.float(), zero, m.bits, m.group_size, m.symmetric, bias))
    return out


def plain_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of the state dict outside the quantized linears; a tied lm_head stored once (transformers
    re-ties it from config.json)."""
    skip = {n + "." for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(s) for s in skip) or (tied and k == "lm_head.weight"):
            continue
        out[k] = v.detach().contiguous().clone()
    return out


def pack_rows(u: Tensor, bits: int) -> Tensor:
    """Unsigned codes [rows, n] → int32 [rows, ceil(n·bits/32)]: each row a dense little-endian bit stream
    (code j at bits [j·bits, (j+1)·bits), crossing word boundaries where it must), the rows word-aligned."""
    rows, n = u.shape
    pad = (-n) % 32
    u = torch.nn.functional.pad(u.to(torch.int64), (0, pad))
    words = u.view(rows, -1, 32)  # 32 codes = exactly `bits` words
    shifts = torch.arange(32) * bits
    bit_stream = torch.zeros(rows, words.shape[1], bits, dtype=torch.int64)
    for j in range(32):  # code j of each chunk: low part into word w, the rest into w + 1
        w, off = divmod(int(shifts[j]), 32)
        bit_stream[:, :, w] |= (words[:, :, j] << off) & 0xFFFFFFFF
        if off + bits > 32:
            bit_stream[:, :, w + 1] |= words[:, :, j] >> (32 - off)
    out = bit_stream.view(rows, -1)[:, : -(-n * bits // 32)]
    return _to_int32(out)


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_rows`: int32 [rows, words] → unsigned codes [rows, n] (int32)."""
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    chunks = -(-n // 32)
    words = torch.nn.functional.pad(words, (0, chunks * bits - words.shape[1])).view(rows, chunks, bits)
    out = torch.zeros(rows, chunks, 32, dtype=torch.int64)
    mask = (1 << bits) - 1
    for j in range(32):
        w, off = divmod(j * bits, 32)
        v = words[:, :, w] >> off
        if off + bits > 32:
            v = v | (words[:, :, w + 1] << (32 - off))
        out[:, :, j] = v & mask
    return out.view(rows, -1)[:, :n].to(torch.int32)


def _to_int32(x: Tensor) -> Tensor:
    """Unsigned 32-bit values held in int64 → the same bits as int32."""
    return (x - ((x >> 31) & 1) * (1 << 32)).to(torch.int32)


def write(out: Path, model: nn.Module, tokenizer, tensors: dict[str, Tensor], quantization_config: dict,
          extra_files: dict[str, dict] | None = None) -> Path:  # fmt: skip
    """config.json (+ quantization_config), generation config, tokenizer, model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    for name, obj in (extra_files or {}).items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out


def detect(path: str | Path) -> str | None:
    """The external format of a checkpoint directory, from its config.json: compressed-tensors, gptq or None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    method = json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method")
    return method if method in FORMATS else None


def skeleton(path: Path, attn: str):
    """(model with parameters on the meta device and no quantization_config, its saved dtype, tensors)."""
    from transformers import AutoConfig

    from qat.export import empty_model

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the modules ourselves
    saved = getattr(config, "dtype", None) or torch.float32
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    return empty_model(config, saved, attn), saved, load_file(str(path / WEIGHTS_FILE))


def finish(model: nn.Module, tensors: dict[str, Tensor], path: Path, saved: torch.dtype,
           dtype: torch.dtype | None) -> nn.Module:  # fmt: skip
    """Load the plain tensors into the skeleton (assign), re-tie, check nothing is missing, cast to `dtype`."""
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    held = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QuantizedLinear))  # filled by `shell`
    missing = [k for k in missing if not (tied and k == "lm_head.weight") and not k.startswith(held)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    if dtype is not None and dtype != saved:
        cast_floats(model, dtype)
    return model


def shell(model: nn.Module, name: str, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype,
          codes: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None) -> None:  # fmt: skip
    """Put a QuantizedLinear holding these codes (signed if symmetric) in place of the linear `name`."""
    from qat import quant
    from qat.swap import replace_module

    lin = model.get_submodule(name)
    q = QuantizedLinear(lin.in_features, lin.out_features, bits, group_size, symmetric, bias is not None, dtype)
    q.qweight = quant.pack_codes(codes, bits, symmetric)
    q.scale = scale.float().contiguous()
    if zero is not None:
        q.zero_point = zero.float().contiguous()
    if bias is not None:
        q.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    replace_module(model, name, q)
