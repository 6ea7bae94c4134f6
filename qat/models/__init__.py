"""Model families and the one loader: `load(path) -> (model, tokenizer)`.

`path` is a released checkpoint (local directory or hub id) or an artifact this toolkit wrote
(`<out_dir>/final/`, recognised by its `quantization.json`). The family comes from `config.json`'s
`model_type`: `qwen3` (and other causal LMs) → qat.models.qwen3; `CoDA` → qat.models.coda (the diffusion
family; importing it registers the CoDA config and model with transformers' Auto classes, which is how
artifacts of either family are rebuilt from their config.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch

from qat.models import coda, qwen3

FAMILIES: dict[str, ModuleType] = {"qwen3": qwen3, "coda": coda}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_path(path: str, key: str = "model.path") -> None:
    """FileNotFoundError for a path that looks local (absolute, relative, existing, or not `org/name`) but is not
    a directory; hub ids are left to the loader."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"{key}={path}: no such directory (and not a hub id of the form org/name)")


def family_of(path: str) -> str:
    """Family name from a checkpoint's config.json (`model_type`)."""
    local = Path(path) / "config.json"
    if local.is_file():
        model_type = json.loads(local.read_text()).get("model_type", "")
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(path).model_type
    return "coda" if model_type == coda.MODEL_TYPE else "qwen3"


def adapter(family: str) -> ModuleType:
    if family not in FAMILIES:
        raise NotImplementedError(f"model family {family!r} is not available yet (have: {', '.join(FAMILIES)})")
    return FAMILIES[family]


def load(path: str | Path, dtype: str | torch.dtype | None = None, attn: str = "sdpa"):
    """(model, tokenizer) from a released checkpoint or one of our artifacts; eval mode."""
    from qat import export, formats
    from qat.formats import ct, gptq  # noqa: F401  (formats.ct / formats.gptq)

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if export.is_artifact(path):
        model, tok = export.load_artifact(path, dtype=dtype, attn=attn)
    elif fmt := formats.detect(path):  # compressed-tensors / GPTQ exports: read into QuantizedLinear modules
        from transformers import AutoTokenizer

        reader = formats.ct.load if fmt == "compressed-tensors" else formats.gptq.load
        model, tok = reader(Path(path), dtype=dtype, attn=attn), AutoTokenizer.from_pretrained(path)
    else:
        model, tok = adapter(family_of(str(path))).load(str(path), dtype=dtype or torch.float32, attn=attn)
    return model.eval(), tok
