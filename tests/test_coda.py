"""CoDA loading and forward: the released format (keys, shapes, config quirks, shards, dtypes, tying) and
the forward against an independent re-derivation of the reference computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from qat.models import coda, family_of, load
from qat.models.tiny import build_coda
from tests.conftest import ROOT, SHARED

REAL = SHARED / "data" / "coda_checkpoint_format"
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The reference's state dict (coda.md §1.2) as a formula of the config."""
    h, hd, v = c["hidden_size"], c["head_dim"], c["vocab_size"]
    q, kv, i = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }  # fmt: skip
    return shapes


@pytest.fixture(scope="module")
def real_format(tmp_path_factory):
    """A tiny random CoDA in the released format with the real tokenizer files (vocab 151936), fp32, 2 shards."""
    if not REAL.is_dir():
        pytest.skip(f"{REAL} not available")
    return build_coda(tmp_path_factory.mktemp("coda") / "ckpt", dtype=torch.float32, tokenizer_dir=REAL, shards=2,
                      **SMALL)  # fmt: skip


def test_released_format_loads(real_format):
    config = json.loads((real_format / "config.json").read_text())
    real = json.loads((REAL / "config.json").read_text())
    assert set(config) == set(real) and config["rope_scaling"] is None and "tie_word_embeddings" not in config
    assert family_of(str(real_format)) == "coda"
    model, tok = load(real_format)
    sd = model.state_dict()
    shapes = expected_shapes(config)
    assert len(shapes) == 2 + 11 * config["num_hidden_layers"] + 1
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes  # rotary inv_freq is not persistent
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.mask_token_id == tok.mask_token_id == 151669
    assert model.config.pad_token_id == tok.pad_token_id == 151643 and tok.eos_token_id == 151645
    assert tok.encode("<|im_start|>assistant", add_special_tokens=False) == [151644, 77091]
    assert model.config.rope_parameters["rope_theta"] == 1e6 and not model.config.use_cache


def test_weights_and_dtypes(real_format, tmp_path):
    from safetensors.torch import load_file

    stored = {}
    for f in sorted(real_format.glob("*.safetensors")):
        stored |= load_file(f)
    m32, _ = load(real_format)
    assert all(torch.equal(m32.state_dict()[k], v) for k, v in stored.items())
    m16, _ = load(real_format, dtype="bfloat16")
    assert all(torch.equal(m16.state_dict()[k], v.bfloat16()) for k, v in stored.items())
    # a bf16 checkpoint cast up to fp32 keeps its values
    bf = build_coda(tmp_path / "bf16", seed=1, dtype=torch.bfloat16, **SMALL)
    stored = load_file(bf / "model.safetensors")
    m, _ = load(bf, dtype="float32")
    assert m.dtype == torch.float32 and all(torch.equal(m.state_dict()[k], v.float()) for k, v in stored.items())


def test_ties_only_without_head(tmp_path):
    d = build_coda(tmp_path / "tied", tie=True, **SMALL)
    model, _ = load(d)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_rope_scaling_spellings(tmp_path):
    ok = build_coda(tmp_path / "default", rope_scaling={"rope_type": "default"}, **SMALL)
    assert load(ok)[0].config.rope_parameters["rope_type"] == "default"
    bad = build_coda(tmp_path / "yarn", **SMALL)
    c = json.loads((bad / "config.json").read_text()) | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="rope_scaling"):
        load(bad)


def test_strict_keys(tmp_path):
    d = build_coda(tmp_path / "c", **SMALL)
    from safetensors.torch import load_file, save_file

    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="do not match"):
        load(d)


def reference_forward(sd: dict[str, torch.Tensor], c: dict, ids: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """CoDA's eval forward re-derived from the notes (coda.md §1.3), in plain torch on a state dict."""
    eps, hd = c["rms_norm_eps"], c["head_dim"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]

    def rms(x, w):
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rope(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    B, L = ids.shape
    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.arange(L).float()[:, None] * inv[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    h = sd["model.embed_tokens.weight"][ids]
    for n in range(c["num_hidden_layers"]):
        p = lambda k: sd[f"model.layers.{n}.{k}.weight"]  # noqa: B023
        x = rms(h, p("input_layernorm"))
        q = rms((x @ p("self_attn.q_proj").T).view(B, L, nh, hd), p("self_attn.q_norm")).transpose(1, 2)
        k = rms((x @ p("self_attn.k_proj").T).view(B, L, nkv, hd), p("self_attn.k_norm")).transpose(1, 2)
        v = (x @ p("self_attn.v_proj").T).view(B, L, nkv, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if causal:
            scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, nh * hd)
        h = h + a @ p("self_attn.o_proj").T
        x = rms(h, p("post_attention_layernorm"))
        h = h + (F.silu(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_forward_matches_reference_derivation():
    d = ROOT / "checkpoints" / "micro-coda"
    model, _ = load(d)
    c = json.loads((d / "config.json").read_text())
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    ids[:, -3:] = model.config.mask_token_id
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ref = reference_forward(model.state_dict(), c, ids)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_bidirectional_and_causal_equals_qwen3():
    model, _ = load(ROOT / "checkpoints" / "micro-coda")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits[0, 0], model(input_ids=later).logits[0, 0])
        # switch causality back on: the backbone is then transformers' Qwen3 on the same weights
        qcfg = Qwen3Config(**{k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "is_causal")})
        qwen = Qwen3ForCausalLM(qcfg).eval()
        qwen.load_state_dict(model.state_dict(), strict=True)
        model.config.is_causal = True
        for m in model.modules():
            if hasattr(m, "is_causal"):
                m.is_causal = True
        causal = model(input_ids=ids).logits
        assert torch.equal(causal, qwen(input_ids=ids).logits)
        assert torch.equal(model(input_ids=later).logits[0, 0], causal[0, 0])
        ref = reference_forward(model.state_dict(), json.loads(model.config.to_json_string()) | {"rope_theta": 1e6},
                                ids, causal=True)  # fmt: skip
    torch.testing.assert_close(causal, ref, atol=2e-5, rtol=1e-5)


def test_generate_is_not_autoregressive():
    model, _ = load(ROOT / "checkpoints" / "micro-coda")
    with pytest.raises(TypeError, match="diffusion_generate"):
        model.generate(torch.zeros(1, 3, dtype=torch.long))
    assert coda.CoDAForMaskedDiffusion.family == "coda"
