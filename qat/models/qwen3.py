"""The autoregressive family: Qwen3 (and any causal LM transformers loads with AutoModelForCausalLM).

Loading is transformers' own; the only policy here is the attention implementation: flash-attn is an
optional extra, so `flash_attention_2` falls back to SDPA (with a warning) where it cannot run.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import is_flash_attn_2_available


def resolve_attn(attn: str) -> str:
    if attn == "flash_attention_2" and not is_flash_attn_2_available():
        warnings.warn("flash-attn is not usable here (not installed or no CUDA): using sdpa", stacklevel=2)
        return "sdpa"
    return attn


def load(
    path: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A released checkpoint (local directory or hub id) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=resolve_attn(attn))
    return model, AutoTokenizer.from_pretrained(path)
