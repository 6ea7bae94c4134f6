"""prepare / convert / set_fake_quant and the artifact: bit-exact equivalences on a tiny random Qwen3."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from qat import quant
from qat.config import QuantConfig
from qat.export import load_artifact, save_artifact, size_report
from qat.modules import FakeQuantLinear, QuantizedLinear
from qat.swap import convert, prepare, quant_stats, set_fake_quant, skipped

MODES = [
    QuantConfig(bits=4, group_size=128),
    QuantConfig(bits=3, group_size=-1, symmetric=False),
    QuantConfig(bits=2, group_size=128, symmetric=False, scales="lsq", mse=True),
    QuantConfig(bits=8, group_size=128, scales="dynamic"),
]


def logits(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_disabled_fake_quant_is_the_original_model(model, ids):
    ref = logits(model, ids)
    params = {n: p for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    prepare(model, QuantConfig())
    assert set_fake_quant(model, False) == 14
    assert torch.equal(logits(model, ids), ref)
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear):
            assert m.weight is params[f"{name}.weight"]  # the very same Parameter objects
    new_keys = set(model.state_dict())
    assert keys <= new_keys and all(".weight_quantizer." in k for k in new_keys - keys)
    assert set(dict(model.named_parameters())) == set(params)  # static scales are buffers, not parameters


def rtn_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """The RTN post-training-quantized model, built without the swap: weights replaced by their quantized values."""
    m = copy.deepcopy(model)
    for name, lin in m.named_modules():
        if type(lin) is nn.Linear and not skipped(name, cfg.skip):
            n = quant.group_count(lin.in_features, cfg.group_size)
            s, z = quant.minmax_qparams(lin.weight, cfg.bits, n, cfg.symmetric)
            lin.weight.data = quant.dequantize(quant.quantize(lin.weight, s, z, cfg.bits, cfg.symmetric), s, z)
    return m


@pytest.mark.parametrize(
    "cfg", [QuantConfig(bits=4, group_size=128), QuantConfig(bits=3, group_size=-1, symmetric=False)]
)
def test_prepared_model_at_step0_is_the_rtn_model(model, ids, cfg):
    ref = logits(rtn_model(model, cfg), ids)
    assert torch.equal(logits(prepare(model, cfg), ids), ref)


@pytest.mark.parametrize(
    "cfg", MODES, ids=lambda c: f"w{c.bits}g{c.group_size}-{'sym' if c.symmetric else 'asym'}-{c.scales}"
)
def test_convert_computes_what_prepare_computed(model, ids, cfg, tmp_path):
    prepare(model, cfg)
    if cfg.scales == "lsq":  # learned state that no longer equals its init must survive convert and save/load
        with torch.no_grad():
            for _, m in model.named_modules():
                if isinstance(m, FakeQuantLinear):
                    m.weight_quantizer.scale.mul_(0.9)
                    m.weight_quantizer.zero_point.add_(0.4)
    before = logits(model, ids)
    convert(model)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    assert torch.equal(logits(model, ids), before)

    save_artifact(model, None, None, tmp_path)
    loaded, _ = load_artifact_without_tokenizer(tmp_path)
    assert torch.equal(logits(loaded, ids), before)
    r = size_report(loaded, tmp_path)
    assert r["ratio"] < 1.0


def load_artifact_without_tokenizer(path):
    import transformers

    orig = transformers.AutoTokenizer.from_pretrained
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: None)
    try:
        return load_artifact(path)
    finally:
        transformers.AutoTokenizer.from_pretrained = orig


def test_skip_patterns_and_swap_log(model, caplog):
    cfg = QuantConfig(skip=["lm_head", "*embed*", "mlp.*"])
    with caplog.at_level(logging.INFO, logger="qat.swap"):
        prepare(model, cfg)
    assert "swapped 8/15 linears" in caplog.text  # 2 layers × (q, k, v, o) of 2 × 7 + lm_head
    names = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert names and not any("mlp" in n for n in names)
    assert skipped("base_model.model.lm_head", ["lm_head"]) and not skipped("model.layers.0.mlp.up_proj", ["up"])


def test_bits16_is_a_no_op(model, ids):
    ref = logits(model, ids)
    prepare(model, QuantConfig(bits=16))
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)


def test_group_size_must_divide(model):
    from qat.config import RecipeError

    with pytest.raises(RecipeError, match=r"group_size=96 does not divide the input width \d+ of model\.layers\.0\."):
        prepare(model, QuantConfig(group_size=96))


def test_lsq_scales_are_parameters_and_learn(model, ids):
    prepare(model, QuantConfig(bits=3, scales="lsq", symmetric=False))
    scales = [p for n, p in model.named_parameters() if n.endswith("weight_quantizer.scale")]
    zeros = [p for n, p in model.named_parameters() if n.endswith("weight_quantizer.zero_point")]
    assert len(scales) == len(zeros) == 14
    with torch.no_grad():  # shrink the steps so that codes saturate: only then does a zero point get a gradient
        for s in scales:
            s.mul_(0.7)
    model(input_ids=ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)
    assert any(p.grad.abs().sum() > 0 for p in zeros)


def test_quant_stats_error_and_flips(model):
    prepare(model, QuantConfig(bits=4))
    stats, codes = quant_stats(model)
    assert 0 < stats["quant/rel_error"] < 0.2 and "quant/flip_fraction" not in stats
    stats, codes2 = quant_stats(model, codes)
    assert stats["quant/flip_fraction"] == 0.0
    with torch.no_grad():
        lin = model.model.layers[0].mlp.up_proj
        lin.weight[0] += lin.weight_quantizer.scale[0].repeat_interleave(128) * 1.0  # every code in row 0 moves
    stats, _ = quant_stats(model, codes2)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, FakeQuantLinear))
    assert 0 < stats["quant/flip_fraction"] <= lin.in_features / total


def test_fake_quant_linear_under_peft_lora(model, ids):
    """PEFT wraps FakeQuantLinear like any nn.Linear; at init (B = 0) the output is unchanged."""
    from peft import LoraConfig, get_peft_model

    prepare(model, QuantConfig())
    ref = logits(model, ids)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(logits(peft_model, ids), ref)
