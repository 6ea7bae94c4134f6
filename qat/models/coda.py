"""The diffusion family: CoDA (Salesforce), a Qwen3 backbone trained as a masked-diffusion LM.

CoDA's network is Qwen3's, layer for layer and name for name (`model.layers.N.self_attn.q_proj.weight`, …,
a separate `lm_head.weight`); what differs is how it is used:

    attention   bidirectional, and with no attention mask at all: every position sees every other one,
                padding included (the reference builds a causal mask and never passes it to SDPA)
    positions   0..L-1 whatever the padding
    output      raw logits [B, L, V], not shifted; logits[:, i] is trained to predict token i+1 (an AR-style
                shift inherited from the Qwen3 initialisation), so the sampler right-shifts them
    head        its own trained `lm_head`, although the config's class default says tie_word_embeddings

So the model here *is* transformers' `Qwen3ForCausalLM` with causality switched off in both places that
decide it (`config.is_causal` for the SDPA/eager mask builder, `module.is_causal` for flash-attention),
and no KV cache (there is no causal prefix to cache). Reusing transformers keeps fake-quant swapping, PEFT,
DeepSpeed and flash-attn identical for both families. The forward equals the reference one on the same
weights (RMSNorm in fp32, q/k RMSNorm per head before non-interleaved RoPE, GQA by contiguous repeat,
SDPA with scale 1/√head_dim): tests/test_coda.py checks it against an independent re-derivation.

Loading (`load`) reads the released format (`config.json` with `model_type: "CoDA"`, written by
transformers 4.47, with `rope_theta`, `rope_scaling: null`, remote-code `auto_map`, training-only keys such as
`sampling_eps`), single or sharded safetensors, fp32 or bf16, and ties the head to the embeddings only when the
files carry no `lm_head.weight`. The remote code is never run. Not covered: `rope_scaling` other than none /
"default" (the reference raises too); the training-mode forward of the reference, which noises its own input:
here the masked-diffusion loss lives in qat/objectives.py and `forward` is always the clean inference pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
from transformers.utils import cached_file

from qat.models.qwen3 import resolve_attn

MODEL_TYPE = "CoDA"


class CoDAConfig(Qwen3Config):
    """Qwen3's config with CoDA's defaults (the 1.7B numbers) and its special tokens. Unknown keys from the
    released config.json (`attention_kernel`, `sampling_eps`, …) are kept as plain attributes."""

    model_type = MODEL_TYPE

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    use_cache: bool = False  # bidirectional: nothing to cache
    is_causal: bool = False
    pad_token_id: int | None = 151643  # <|endoftext|>
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645  # <|im_end|>
    mask_token_id: int = 151669  # <|mask|>

    def __post_init__(self, **kwargs):
        scaling = kwargs.pop("rope_scaling", None)  # transformers 4.x spelling; null in the released config
        if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
            raise ValueError(f"CoDA: rope_scaling={scaling} is not supported (the reference supports none either)")
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": float(kwargs.pop("rope_theta", 1e6))}
        kwargs.pop("auto_map", None)  # points at the reference's remote code, which must not be used
        super().__post_init__(**kwargs)


class CoDAForMaskedDiffusion(Qwen3ForCausalLM):
    """Qwen3ForCausalLM made bidirectional. `model(input_ids).logits` are CoDA's raw, unshifted logits.
    Generate with `qat.models.sampler.diffusion_generate`, not `generate` (which is autoregressive)."""

    config_class = CoDAConfig
    family = "coda"

    def __init__(self, config: CoDAConfig):
        config.is_causal = False  # SDPA/eager: the mask builder returns a full (no) mask
        config.use_cache = False
        config.architectures = [type(self).__name__]  # not the reference's remote-code class
        super().__init__(config)
        for m in self.modules():
            if hasattr(m, "is_causal"):  # flash-attention reads the module flag
                m.is_causal = False

    def generate(self, *args, **kwargs):
        raise TypeError("CoDA is a diffusion LM: sample with qat.models.sampler.diffusion_generate(model, ids, ...)")


# The released CoDA config.json, field for field (values are the 1.7B ones; sizes are overridden).
RELEASED_CONFIG = {
    "architectures": ["CoDALanguageModel"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_kernel": "flash_attention",
    "auto_map": {"AutoConfig": "model_config.CoDAConfig", "AutoModel": "modeling_coda.CoDALanguageModel"},
    "block_masking_probability": [0.25, 0.5, 0.5, 0.75, 0.25], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "mask_block_sizes": [4, 8, 16, 32],
    "mask_token_id": 151669, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "CoDA",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "pad_token_id": 151643,
    "prefix_probability": 0, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000,
    "sampling_eps": [0.001, 0.25, 0.5, 0.25, 0.001], "sliding_window": None, "torch_dtype": "float32",
    "transformers_version": "4.47.1", "truncate_probability": 0, "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}  # fmt: skip


def released_config(config: Qwen3Config, **overrides) -> dict:
    """config.json in the released field set (RELEASED_CONFIG) with the sizes and token ids of `config`."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "pad_token_id",
            "bos_token_id", "eos_token_id", "mask_token_id")  # fmt: skip
    fields = {**RELEASED_CONFIG, **{k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}}
    fields.update(max_window_layers=config.num_hidden_layers, rope_theta=config.rope_parameters["rope_theta"])
    return {**fields, **overrides}


def save_released(model: Qwen3ForCausalLM, out: str | Path, fields: dict, shards: int = 1, tie: bool = False
                  ) -> Path:  # fmt: skip
    """Write `model` in CoDA's released format: `fields` as config.json, the tensors under the reference's names
    in one safetensors file or `shards` files with an index; tie=True leaves `lm_head.weight` out (the loader
    then ties the head to the embeddings). Tied weights are stored once either way."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tie = tie or model.lm_head.weight is model.model.embed_tokens.weight
    dtype = model.lm_head.weight.dtype
    (out / "config.json").write_text(json.dumps({**fields, "torch_dtype": str(dtype).removeprefix("torch.")},
                                                indent=2) + "\n")  # fmt: skip
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i in range(shards):
        part = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i::shards]
        save_file({k: tensors[k] for k in chunk}, str(out / part), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, part))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def from_qwen3(path: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """(CoDA model, tokenizer) adapted from a Qwen3 checkpoint, as CoDA was made from Qwen3: the same weights
    with causality switched off; `mask_token_id` comes from the tokenizer's mask token. The masked-diffusion
    objective then teaches it to denoise (qat/objectives.py)."""
    tok = AutoTokenizer.from_pretrained(path)
    if tok.mask_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no mask token, which a CoDA model needs (<|mask|>)")
    src = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=resolve_attn(attn))
    if src.config.model_type != "qwen3":
        raise ValueError(f"{path}: CoDA adapts a Qwen3 checkpoint, not {src.config.model_type!r}")
    fields = src.config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache"):
        fields.pop(k, None)
    config = CoDAConfig(**{**fields, "mask_token_id": tok.mask_token_id})
    model = CoDAForMaskedDiffusion(config).to(dtype)
    model.load_state_dict(src.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), tok


AutoConfig.register(MODEL_TYPE, CoDAConfig, exist_ok=True)
AutoModelForCausalLM.register(CoDAConfig, CoDAForMaskedDiffusion, exist_ok=True)


def weight_names(path: str) -> set[str]:
    """Tensor names stored in a checkpoint (local dir or hub id): the sharded index, else model.safetensors."""
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        return set(json.loads(Path(index).read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(cached_file(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def load(path: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """(model, tokenizer) from a released CoDA checkpoint (local directory or hub id), eval mode.

    Strict: a tensor missing from the files (other than a tied head) or one the model does not have is an error,
    as in the reference's `load_state_dict(strict=True)`."""
    config = CoDAConfig.from_pretrained(path)
    config.tie_word_embeddings = "lm_head.weight" not in weight_names(path)
    model, info = CoDAForMaskedDiffusion.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=resolve_attn(attn), output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{path}: weights do not match the CoDA architecture: {bad}")
    return model.eval(), AutoTokenizer.from_pretrained(path)
