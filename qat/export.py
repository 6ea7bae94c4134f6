"""The artifact every run ends with: an HF-style directory with packed integer weights; and its export.

    python -m qat.export checkpoint=DIR format=compressed-tensors|gptq out=DIR2     (qat/formats/)

Layout of `<out_dir>/final/`:

    config.json, generation_config.json   the model's transformers config (unchanged)
    tokenizer files                       as the tokenizer saves them
    model.safetensors                     float tensors as trained (embeddings, norms, skipped linears) and,
                                          per quantized linear, `qweight` (uint8, codes packed `bits` per
                                          value), `scale` (float32 [out, in/group]) and, when asymmetric,
                                          `zero_point` (float32)
    quantization.json                     format tag, the quant settings, the dtype and every quantized
                                          module with its bits/group/symmetry (per-module, so mixed
                                          precision needs no other format)
    recipe.yaml                           the resolved recipe that produced it

`load_artifact` rebuilds the transformers model from config.json, swaps the listed linears for
QuantizedLinear shells and loads the tensors strictly, so a loaded artifact computes exactly what the
converted model computed. A float baseline (quant.bits=16) is the same directory with no quantized modules.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qat.config import Recipe, RecipeError, exit_on_error, parse_cli, save_recipe
from qat.modules import QuantizedLinear, cast_floats

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "qat-packed-v1"


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_artifact(model: nn.Module, tokenizer, recipe: Recipe | None, out: str | Path) -> Path:
    """Write a converted (or float) model as an artifact directory; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modules = {
        name: {
            "bits": m.bits,
            "group_size": m.group_size,
            "symmetric": m.symmetric,
            "bias": m.bias is not None,
            **({"offset": True} if m.offset is not None else {}),
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tensors, tied = _unshared_state_dict(model)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "dtype": _dtype_name(dtype),
        "tied": tied,
        "quant": None if recipe is None else asdict(recipe.quant),
        "modules": modules,
    }
    (out / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if recipe is not None:
        save_recipe(recipe, out)
    return out


def _unshared_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with tied tensors stored once ({dropped key: kept key}) and every tensor owning its storage
    (DeepSpeed and others leave parameters as views into flat buffers, which safetensors refuses)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        ident = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride())
        if v.numel() and ident in seen:
            tied[k] = seen[ident]
            continue
        seen[ident] = k
        owns = v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
        tensors[k] = v if owns else v.clone(memory_format=torch.contiguous_format)
    return tensors, tied


def empty_model(config, dtype: torch.dtype, attn: str = "sdpa") -> nn.Module:
    """The transformers model of `config` with its parameters on the meta device (no random initialisation of
    weights about to be replaced); buffers not in a weights file, like the rotary frequencies, built for real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qat.models.qwen3 import resolve_attn

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=resolve_attn(attn))


def load_artifact(path: str | Path, dtype: torch.dtype | None = None, attn: str = "sdpa"):
    """(model, tokenizer) from an artifact directory written by `save_artifact`."""
    from transformers import AutoConfig, AutoTokenizer

    from qat.swap import replace_module

    path = Path(path)
    meta = json.loads((path / QUANT_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown artifact format {meta.get('format')!r} (expected {FORMAT})")
    saved = getattr(torch, meta["dtype"])
    model = empty_model(AutoConfig.from_pretrained(path), saved, attn)
    for name, m in meta["modules"].items():
        lin = model.get_submodule(name)
        shell = QuantizedLinear(lin.in_features, lin.out_features, m["bits"], m["group_size"], m["symmetric"],
                                m["bias"], saved, offset=m.get("offset", False))  # fmt: skip
        replace_module(model, name, shell)
    tensors = load_file(str(path / WEIGHTS_FILE))
    for dropped, kept in meta.get("tied", {}).items():
        tensors[dropped] = tensors[kept]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if meta.get("tied"):
        model.tie_weights()  # one Parameter again where the file stored one tensor
    if dtype is not None and dtype != saved:
        cast_floats(model, dtype)
    return model, AutoTokenizer.from_pretrained(path)


def size_report(model: nn.Module, path: str | Path) -> dict[str, float]:
    """Bytes of the weights file vs the same model stored in bf16 (2 bytes per parameter)."""
    n_params = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            n_params += m.in_features * m.out_features
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n_params += p.numel()
    disk = (Path(path) / WEIGHTS_FILE).stat().st_size
    return {"bytes": disk, "bf16_bytes": 2 * n_params, "ratio": disk / (2 * n_params)}


@dataclass
class ExportConfig:
    checkpoint: str = "???"  # an artifact directory written by the trainer
    format: str = "compressed-tensors"  # compressed-tensors | gptq
    out: str = "???"


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the artifact at `checkpoint` in format `fmt` (qat/formats/) to `out`; returns `out`."""
    from qat.formats import FORMATS, ct, gptq

    if fmt not in FORMATS:
        raise RecipeError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not is_artifact(checkpoint):
        raise RecipeError(f"checkpoint={checkpoint}: not an artifact of this toolkit (no {QUANT_FILE})")
    model, tokenizer = load_artifact(checkpoint)
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise RecipeError(f"checkpoint={checkpoint}: a float artifact (quant.bits=16) has nothing to export; "
                          "save it with transformers' save_pretrained")  # fmt: skip
    writer = ct.export if fmt == "compressed-tensors" else gptq.export
    return writer(model, tokenizer, Path(out))


def main(argv: list[str] | None = None) -> Path:
    with exit_on_error(FileNotFoundError, ValueError):
        cfg = parse_cli(ExportConfig, sys.argv[1:] if argv is None else argv)  # checkpoint= and out= required
        out = export(cfg.checkpoint, cfg.format, cfg.out)
    print(f"wrote {out} ({cfg.format})")
    return out


if __name__ == "__main__":
    main()
