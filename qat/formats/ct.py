"""compressed-tensors `pack-quantized`: the layout llm-compressor writes, transformers and vLLM read.

Per quantized linear `<name>`:

    weight_packed       int32 [out, ceil(in·b/32)]   the codes shifted to unsigned (q + 2^(b−1), the format's
                                                     signed codes; our asymmetric codes are already unsigned and
                                                     map to q − 2^(b−1)), each row a dense little-endian bit stream
    weight_scale        float32 [out, groups]        (`scale_dtype: torch.float32`: our scales, not rounded)
    weight_zero_point   int32 [ceil(out·b/32), groups]   asymmetric only: zero points, shifted and packed the same
                                                     way along dim 0
    weight_shape        int64 [2]                    (out, in)
    bias                as trained

`quantization_config` has one config group per distinct (bits, group size, symmetry), each targeting its modules
by exact-name regex (so mixed precision needs nothing else); strategy `group` or `channel` (group_size −1);
`ignore` lists the linears left in float (lm_head by default). Dequantization, ŵ = (q − zp)·s per group, is ours
exactly. What it does not allow: a zero point that is not an integer on the grid (a learned one may drift off it:
the export refuses), activation quantization (we have none).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qat.formats import Linear, finish, linears, pack_rows, plain_tensors, shell, skeleton, unpack_rows, write

FORMAT = "pack-quantized"


def _args(lin: Linear) -> dict:
    per_channel = lin.group_size == -1 or lin.group_size == lin.codes.shape[1]
    return {"num_bits": lin.bits, "type": "int", "symmetric": lin.symmetric,
            "group_size": None if per_channel else lin.group_size, "strategy": "channel" if per_channel else "group",
            "dynamic": False, "actorder": None, "scale_dtype": "torch.float32", "zp_dtype": "torch.int8",
            "observer": "minmax", "observer_kwargs": {}}  # fmt: skip


def export(model: nn.Module, tokenizer, out: Path) -> Path:
    tensors = plain_tensors(model)
    groups: dict[tuple, list[str]] = {}
    for lin in linears(model):
        n_out, n_in = lin.codes.shape
        tensors[f"{lin.name}.weight_packed"] = pack_rows(lin.unsigned, lin.bits)
        tensors[f"{lin.name}.weight_scale"] = lin.scale.contiguous()
        tensors[f"{lin.name}.weight_shape"] = torch.tensor([n_out, n_in])
        if lin.zero is not None:  # the format's zero point is signed like its codes: z − 2^(b−1), then shifted back
            tensors[f"{lin.name}.weight_zero_point"] = pack_rows(lin.zero.t().contiguous(), lin.bits).t().contiguous()
        if lin.bias is not None:
            tensors[f"{lin.name}.bias"] = lin.bias.contiguous()
        key = json.dumps(_args(lin), sort_keys=True)
        groups.setdefault(key, []).append(lin.name)
    quantized = {n for names in groups.values() for n in names}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    config = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {f"group_{i}": {"targets": [f"re:^{_escape(n)}$" for n in names], "weights": json.loads(key),
                                         "input_activations": None, "output_activations": None, "format": FORMAT}
                          for i, (key, names) in enumerate(groups.items())},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
    }  # fmt: skip
    return write(out, model, tokenizer, tensors, config)


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def load(path: Path, dtype: torch.dtype | None = None, attn: str = "sdpa") -> nn.Module:
    """Our reader: a model with QuantizedLinear modules from a pack-quantized checkpoint (any family)."""
    import re

    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: compressed-tensors format {cfg.get('format')!r}; this reader reads {FORMAT}")
    model, saved, tensors = skeleton(path, attn)
    schemes = [([re.compile(t[3:]) if t.startswith("re:") else t for t in g["targets"]], g["weights"])
               for g in cfg["config_groups"].values()]  # fmt: skip
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        if f"{name}.weight_packed" not in tensors:
            continue
        args = next((w for targets, w in schemes if any(
            t.fullmatch(name) if isinstance(t, re.Pattern) else t == name for t in targets)), None)  # fmt: skip
        if args is None:
            raise ValueError(f"{path}: {name} is packed but no config group targets it")
        bits, sym = args["num_bits"], args["symmetric"]
        n_out, n_in = (int(x) for x in tensors.pop(f"{name}.weight_shape"))
        u = unpack_rows(tensors.pop(f"{name}.weight_packed"), bits, n_in)
        scale = tensors.pop(f"{name}.weight_scale")
        zero = None
        if not sym:
            zero = unpack_rows(tensors.pop(f"{name}.weight_zero_point").t().contiguous(), bits, n_out).t()
        codes = u - (1 << (bits - 1)) if sym else u
        group = -1 if args.get("strategy") == "channel" else args["group_size"]
        shell(model, name, bits, group, sym, saved, codes, scale, zero, tensors.pop(f"{name}.bias", None))
    return finish(model, tensors, path, saved, dtype)

