"""The GPTQ v1 checkpoint layout (AutoGPTQ/GPTQModel `gptq` format), for symmetric 2/4/8-bit grids.

Per quantized linear `<name>` (b bits, K inputs, N outputs, G groups of g inputs):

    qweight   int32 [K·b/32, N]   unsigned codes u = q + 2^(b−1), packed along the *input* dimension, LSB first
                                  (32/b codes per word)
    qzeros    int32 [G, N·b/32]   zero points packed along the output dimension; v1 stores z − 1, so the symmetric
                                  z = 2^(b−1) is stored as 2^(b−1) − 1 (loaders add the 1 back)
    scales    float16 [G, N]      per group
    g_idx     int32 [K]           group of each input: k // g (no activation-order regrouping: our grids are static)
    bias      float16 [N]         when the linear has one

ŵ = (u − z)·s, our symmetric grid exactly, except that the scales are stored in float16 (the format's dtype):
a relative rounding of at most 2^-11 per scale. config.json `quantization_config` and quantize_config.json:
bits, group_size (−1 per-channel), sym, desc_act false, checkpoint_format gptq; mixed precision writes the most
common setting as the base and the others as GPTQModel/vLLM `dynamic` overrides ("+:^name$"), and linears left
in float inside the decoder as "-:^name$".

What it does not allow: asymmetric grids (v1's z − 1 cannot hold z = 0; use compressed-tensors), 3 bits (its
packing splits codes across words in a scheme of its own; use compressed-tensors), learned zero points.
A real GPTQ loader (GPTQModel, or transformers with optimum + a GPTQ kernel) does not install on this CPU-only
machine; the layout is written from the format's description and checked with our reader (`load`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from qat.formats import finish, linears, pack_rows, plain_tensors, shell, skeleton, unpack_rows, write

BITS = (2, 4, 8)


def export(model: nn.Module, tokenizer, out: Path) -> Path:
    lins = linears(model)
    for lin in lins:
        if not lin.symmetric:
            raise ValueError(f"{lin.name}: GPTQ v1 stores symmetric grids only; use format=compressed-tensors")
        if lin.bits not in BITS:
            raise ValueError(f"{lin.name}: {lin.bits}-bit GPTQ packing is not written here (2, 4, 8 are); "
                             "use format=compressed-tensors")  # fmt: skip
    tensors = plain_tensors(model)
    settings = Counter((lin.bits, lin.group_size) for lin in lins)
    base_bits, base_group = settings.most_common(1)[0][0] if settings else (4, 128)
    dynamic = {}
    for lin in lins:
        n_out, n_in = lin.codes.shape
        g = n_in if lin.group_size == -1 else lin.group_size
        b = lin.bits
        tensors[f"{lin.name}.qweight"] = pack_rows(lin.unsigned, b).t().contiguous()
        z = torch.full((n_in // g, n_out), (1 << (b - 1)) - 1, dtype=torch.int32)  # v1: z − 1
        tensors[f"{lin.name}.qzeros"] = pack_rows(z, b)
        tensors[f"{lin.name}.scales"] = lin.scale.t().contiguous().to(torch.float16)
        tensors[f"{lin.name}.g_idx"] = (torch.arange(n_in) // g).to(torch.int32)
        if lin.bias is not None:
            tensors[f"{lin.name}.bias"] = lin.bias.to(torch.float16)
        if (b, lin.group_size) != (base_bits, base_group):
            dynamic[f"+:^{re.escape(lin.name)}$"] = {"bits": b, "group_size": lin.group_size}
    quantized = {lin.name for lin in lins}
    for name, m in model.named_modules():  # float linears inside the decoder (the lm_head is out by default)
        if isinstance(m, nn.Linear) and name not in quantized and name != "lm_head":
            dynamic[f"-:^{re.escape(name)}$"] = {}
    config = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": base_bits, "group_size": base_group,
              "sym": True, "desc_act": False, "lm_head": "lm_head" in quantized, "pack_dtype": "int32",
              "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
              "meta": {"quantizer": ["qat-toolkit"]}}  # fmt: skip
    if dynamic:
        config["dynamic"] = dynamic
    return write(out, model, tokenizer, tensors, config, extra_files={"quantize_config.json": config})


def _setting(cfg: dict, name: str) -> tuple[int, int] | None:
    """(bits, group_size) of module `name` under the config and its `dynamic` overrides; None if skipped."""
    for pattern, over in cfg.get("dynamic", {}).items():
        sign, regex = (pattern[0], pattern[2:]) if pattern[:2] in ("+:", "-:") else ("+", pattern)
        if re.match(regex, name):
            if sign == "-":
                return None
            return over.get("bits", cfg["bits"]), over.get("group_size", cfg["group_size"])
    return cfg["bits"], cfg["group_size"]


def load(path: Path, dtype: torch.dtype | None = None, attn: str = "sdpa") -> nn.Module:
    """Our reader: a model with QuantizedLinear modules from a GPTQ v1 checkpoint (any family)."""
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    if cfg.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{path}: GPTQ checkpoint_format {cfg['checkpoint_format']!r}; this reader reads gptq (v1)")
    model, saved, tensors = skeleton(path, attn)
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        if f"{name}.qweight" not in tensors:
            continue
        setting = _setting(cfg, name)
        if setting is None:
            raise ValueError(f"{path}: {name} is packed but the config skips it")
        bits, group = setting
        lin = model.get_submodule(name)
        n_in, n_out = lin.in_features, lin.out_features
        g = n_in if group == -1 else group
        g_idx = tensors.pop(f"{name}.g_idx")
        if not torch.equal(g_idx.long(), torch.arange(n_in) // g):
            raise ValueError(f"{path}: {name} regroups its inputs (act-order g_idx); not read here")
        u = unpack_rows(tensors.pop(f"{name}.qweight").t().contiguous(), bits, n_in)
        z = unpack_rows(tensors.pop(f"{name}.qzeros"), bits, n_out).t() + 1  # [N, G]; v1 stored z − 1
        scale = tensors.pop(f"{name}.scales").t().float()
        sym = bool((z == 1 << (bits - 1)).all())
        codes = u - (1 << (bits - 1)) if sym else u
        bias = tensors.pop(f"{name}.bias", None)
        shell(model, name, bits, group, sym, saved, codes, scale, None if sym else z, bias)
    return finish(model, tensors, path, saved, dtype)
