"""AWQ: folding keeps the float function, the scale search lowers the quantized error, clip never hurts its sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.config import QuantConfig
from qat.ptq import awq


def tiny_layer_model(kv_heads: int, seed: int = 0) -> nn.Module:
    """A 1-layer random Qwen3 in float32 whose norms/v/up rows create outlier input channels for every group."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=32,
    )  # fmt: skip
    model = Qwen3ForCausalLM(cfg).float().eval()
    layer = model.model.layers[0]
    with torch.no_grad():  # salient channels as real LLMs have them (large norm weights / value rows)
        layer.input_layernorm.weight[[3, 40, 99]] *= 30
        layer.post_attention_layernorm.weight[[7, 64]] *= 30
        layer.self_attn.v_proj.weight[[5, 40]] *= 30
        layer.mlp.up_proj.weight[[11, 200]] *= 30
    return model


def capture(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float inputs [N, in] of every linear of layer 0, keyed by name relative to the layer."""
    layer, out, hooks = model.model.layers[0], {}, []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            hook = lambda m, a, n=name: out.__setitem__(n, a[0].detach().reshape(-1, m.in_features).clone())
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return out


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_awq_layer_keeps_float_function(kv_heads):
    model = tiny_layer_model(kv_heads)
    layer = model.model.layers[0]
    ids = token_ids()
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    names = [m.name for m in awq.qwen3_mappings(layer)]
    assert names == (["qkv", "o", "gate_up", "down"] if kv_heads == 4 else ["qkv", "gate_up", "down"])

    stats = awq.awq_layer(layer, capture(model, ids), QuantConfig(bits=3, group_size=32), clip=False)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert stats["qkv.ratio"] > 0 and stats["gate_up.ratio"] > 0  # the outliers make a non-trivial scale win
    assert all(stats[f"{n}.awq_loss"] <= stats[f"{n}.rtn_loss"] for n in names)
    changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])]
    assert "input_layernorm.weight" in changed and "self_attn.q_proj.weight" in changed


def test_every_qwen3_mapping_folds_exactly():
    """Random scales on all four groups (v → o included): the logits do not move."""
    model = tiny_layer_model(kv_heads=4)
    ids = token_ids()
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(0)
    for m in awq.qwen3_mappings(model.model.layers[0]):
        awq.apply_scale(m, torch.rand(m.linears[0].in_features, generator=g) * 4 + 0.25)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_clip_touches_only_non_qk():
    """clip=True changes v/o/gate/up/down beyond the scaling, never q/k (same deterministic scale search)."""
    cfg = QuantConfig(bits=3, group_size=32)
    a, b = tiny_layer_model(4), tiny_layer_model(4)
    ids = token_ids()
    awq.awq_layer(a.model.layers[0], capture(a, ids), cfg, clip=False)
    stats = awq.awq_layer(b.model.layers[0], capture(b, ids), cfg, clip=True)
    la, lb = a.model.layers[0].self_attn, b.model.layers[0].self_attn
    assert torch.equal(la.q_proj.weight, lb.q_proj.weight) and torch.equal(la.k_proj.weight, lb.k_proj.weight)
    assert "clip.self_attn.q_proj" not in stats and 0.5 < stats["clip.mlp.down_proj"] <= 1.0
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)


class Norm(nn.Module):
    """RMSNorm-like prev: output = weight ⊙ x (normalisation omitted, it does not interact with the scale)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


def outlier_inputs(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, 256, generator=torch.Generator().manual_seed(seed))
    x[:, [3, 77, 150, 201]] *= 50
    return x


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_lowers_held_out_error(bits, symmetric):
    cfg = QuantConfig(bits=bits, group_size=128, symmetric=symmetric)
    torch.manual_seed(0)
    norm, lin = Norm(256), nn.Linear(256, 192, bias=False)
    # Gaussian weights as in trained LLMs (and Qwen3's init). With nn.Linear's uniform init and a symmetric grid
    # AWQ finds nothing: the group's max-|w| entry always sits half a step off the grid (quant.py), and a scaled
    # salient column often becomes that entry.
    nn.init.normal_(lin.weight, std=0.02)
    mapping = awq.Mapping(norm, [lin], name="one", input_of="lin")
    res = awq.find_scale(mapping, outlier_inputs(1024, seed=1), cfg)
    assert res.ratio > 0 and res.loss < res.rtn_loss and res.loss == min(res.losses)

    x, w, s = outlier_inputs(1024, seed=2), lin.weight.detach(), res.scale  # held-out tokens
    err_rtn = (x @ (awq.rtn(w, cfg) - w).t()).pow(2).mean()
    err_awq = (x @ (awq.rtn(w * s, cfg) / s - w).t()).pow(2).mean()
    assert err_awq < 0.7 * err_rtn

    with torch.no_grad():  # folding: the float output of norm → linear is unchanged
        ref = lin(norm(x))
        awq.apply_scale(mapping, s)
        torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-4)


def test_identity_ratio_is_plain_rtn():
    """With no outliers and n_grid=1 the only candidate is r = 0: s ≡ 1 and the loss is plain RTN's."""
    cfg = QuantConfig(bits=4, group_size=64)
    lin = nn.Linear(128, 32, bias=True)
    x = torch.randn(64, 128)
    res = awq.find_scale(awq.Mapping(Norm(128), [lin]), x, cfg, n_grid=1)
    assert torch.equal(res.scale, torch.ones(128)) and res.ratio == 0
    w = lin.weight.detach()
    with torch.no_grad():
        expected = (F.linear(x, awq.rtn(w, cfg), lin.bias) - lin(x)).pow(2).mean()
    assert res.loss == pytest.approx(float(expected), rel=1e-5)


def test_linear_prev_fold_is_exact():
    """up → down: up's rows (and bias) / s, down's columns · s; the MLP output and down's input / s follow."""
    torch.manual_seed(0)
    gate, up, down = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(96, 64)
    x = torch.randn(40, 64)

    def mlp() -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(gate(x)) * up(x)
        return down(h), h

    with torch.no_grad():
        ref, h_ref = mlp()
        s = torch.rand(96) * 8 + 0.1
        awq.apply_scale(awq.Mapping(up, [down], name="down", input_of="down"), s)
        out, h = mlp()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref / s, rtol=1e-5, atol=1e-6)


def partial_dot_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
    """[out, groups]: mean over tokens of the squared error of each group's partial dot product (explicit)."""
    d = (w_hat - w).view(w.shape[0], -1, group)
    xs = x.view(x.shape[0], -1, group)
    return torch.einsum("ogk,tgk->otg", d, xs).pow(2).mean(1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_never_increases_partial_dot_error(symmetric):
    cfg = QuantConfig(bits=3, group_size=64, symmetric=symmetric)
    torch.manual_seed(0)
    lin = nn.Linear(128, 80, bias=False)
    with torch.no_grad():
        lin.weight[::7, 5] *= 8  # weight outliers: the case where clipping the range pays
    x = outlier_inputs(300, seed=3)[:, :128]  # fewer tokens than n_tokens: the sample is all of x
    w = lin.weight.detach().clone()
    max_val = awq.search_clip(lin, x, cfg)
    assert max_val.shape == (80, 2)
    awq.apply_clip(lin, max_val)
    wc = lin.weight.detach()
    amax = w.view(80, 2, 64).abs().amax(-1)
    assert torch.all(max_val <= amax) and torch.all(max_val >= 0.5 * amax)
    assert torch.equal(wc, torch.clamp(w.view(80, 2, 64), -max_val[..., None], max_val[..., None]).view(80, 128))
    err_clip = partial_dot_error(w, awq.rtn(wc, cfg), x, 64)
    err_none = partial_dot_error(w, awq.rtn(w, cfg), x, 64)
    assert torch.all(err_clip <= err_none * (1 + 1e-5))
    assert (err_clip < err_none).any()
