"""LoRA-QAT (qat/lora.py): only the adapters (and optionally the scales) train, the self teacher is the float base,
the merge is W + BA quantized on the trained grid, step 0 is the PTQ model, resume is bitwise, bad settings fail."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qat import lora, quant
from qat.config import LoraConfig, QuantConfig, RecipeError, load_recipe
from qat.models import load
from qat.modules import FakeQuantLinear, QuantizedLinear
from qat.swap import convert, prepare, set_fake_quant
from tests.conftest import ROOT
from tests.test_train import TINY, run


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def prepared(scales: str = "lsq"):
    model, _ = load(ROOT / "checkpoints/micro-qwen3")
    prepare(model, QuantConfig(bits=4, group_size=32, symmetric=False, scales=scales))
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("train_scales", [False, True])
def test_only_adapters_and_optionally_scales_train(train_scales):
    model = lora.wrap(prepared(), LoraConfig(r=4, scales=train_scales))
    before = snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(input_ids=ids(), labels=ids())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert any("weight_quantizer" in n for n in changed) == train_scales
    assert all("lora_" in n or "weight_quantizer" in n for n in changed), changed - {n for n in changed if "lora_" in n}


def test_self_teacher_is_the_float_base():
    model, _ = load(ROOT / "checkpoints/micro-qwen3")
    with torch.no_grad():
        ref = model(input_ids=ids()).logits
    prepare(model, QuantConfig(bits=2, group_size=32, symmetric=False))
    model = lora.wrap(model, LoraConfig(r=4))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # adapters that change the output
    set_fake_quant(model, False)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids()).logits, ref)


def test_merge_is_the_adapter_folded_in_and_quantized_on_the_trained_grid():
    model = lora.wrap(prepared(), LoraConfig(r=4, alpha=8))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.normal_(std=0.02)
    expected = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            delta = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
            on_grid = m.base_layer.weight_quantizer(m.base_layer.weight)  # what training computed with
            expected[name.removeprefix("base_model.model.")] = (on_grid + delta).detach().clone()
    merged = lora.merge(model)
    assert not lora.is_wrapped(merged) and len(expected) == 14
    for name, w in expected.items():
        fq = merged.get_submodule(name)
        assert isinstance(fq, FakeQuantLinear) and torch.allclose(fq.weight, w, atol=1e-6)
    grids = {n: (m.weight_quantizer.scale.detach().clone(), m.weight_quantizer.zero_point.detach().clone())
             for n, m in merged.named_modules() if isinstance(m, FakeQuantLinear)}  # fmt: skip
    weights = {n: m.weight.detach().clone() for n, m in merged.named_modules() if isinstance(m, FakeQuantLinear)}
    convert(merged)
    for name, (s, z) in grids.items():
        q = merged.get_submodule(name)
        assert isinstance(q, QuantizedLinear)
        assert torch.equal(q.codes().float(), quant.quantize(weights[name].float(), s, torch.round(z), 4, False))


def test_merging_a_small_adapter_keeps_every_code():
    """Adapters below half a step change no code, even where the latent weight sits next to a boundary."""
    model = lora.wrap(prepared(), LoraConfig(r=4))
    codes = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m.weight_quantizer.codes(m.weight)[0]
             for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}  # fmt: skip
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.normal_(std=1e-4)
    merged = lora.merge(model)
    for n, m in merged.named_modules():
        if isinstance(m, FakeQuantLinear):
            assert torch.equal(m.weight_quantizer.codes(m.weight)[0], codes[n]), n


def test_steps0_with_lora_is_the_ptq_artifact(tmp_path):
    plain = run(tmp_path / "a", "train.steps=0")
    with_lora = run(tmp_path / "b", "train.steps=0", "train.lora.r=4")
    a, b = load_file(plain / "model.safetensors"), load_file(with_lora / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_qat_trains_reports_the_merge_and_resumes_bitwise(tmp_path, capsys):
    common = ["train.steps=4", "train.lora.r=4", "train.kd=0.5", "quant.scales=lsq", "train.lora.scales=true",
              "train.eval_every=2", "train.eval_rows=2"]  # fmt: skip
    straight = run(tmp_path / "a", *common)
    out = capsys.readouterr().out
    assert "LoRA-QAT (step 4)" in out and "merged and re-quantized" in out
    run(tmp_path / "b", *common, "train.stop_after=2")
    resumed = run(tmp_path / "b", *common, "train.resume=auto")
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(run(tmp_path / "c", "train.steps=0") / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a if k.endswith("qweight"))  # the adapters changed codes


def test_bad_lora_settings_are_one_line_errors():
    with pytest.raises(RecipeError, match="quant.scales=lsq"):
        load_recipe([*TINY, "train.lora.r=4", "train.lora.scales=true", "quant.scales=static"])
    with pytest.raises(RecipeError, match="train.lora.r"):
        load_recipe([*TINY, "train.lora.r=-1"])
    with pytest.raises(RecipeError, match="no linear named"):
        lora.wrap(prepared(), LoraConfig(r=4, targets=["qkv"]))


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_group_merge_is_exact(family):
    """QA-LoRA: the adapter's delta is constant within each quantization group, so folding it into a per-group
    offset changes no code and the converted model computes what the trained one did."""
    model, _ = load(ROOT / f"checkpoints/micro-{family}")
    prepare(model, QuantConfig(bits=4, group_size=32, symmetric=False, scales="lsq"))
    model = lora.wrap(model, LoraConfig(r=4, merge="group"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.05)
    with torch.no_grad():
        trained = model(input_ids=ids()).logits
        codes = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m.weight_quantizer.codes(m.weight)[0]
                 for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}  # fmt: skip
        merged = convert(lora.merge(model))
        assert torch.allclose(merged(input_ids=ids()).logits, trained, atol=1e-5)
    for n, m in merged.named_modules():
        if isinstance(m, QuantizedLinear):
            assert torch.equal(m.codes().float(), codes[n]) and m.offset is not None, n


def test_group_lora_qat_artifact_computes_the_trained_model(tmp_path, capsys):
    from qat import export

    run(tmp_path, "train.steps=3", "train.lora.r=4", "train.lora.merge=group", "quant.symmetric=false",
        "train.eval_every=3", "train.eval_rows=2", "train.lr=1e-2")  # fmt: skip
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("validation loss ("))
    trained = float(line.split("LoRA-QAT (step 3) ")[1].split()[0])
    merged = float(line.split("merged and re-quantized ")[1].split()[0])
    assert abs(trained - merged) < 1e-4, line
    model, _ = load(tmp_path / "final")
    assert all(m.offset is not None for m in model.modules() if isinstance(m, QuantizedLinear))
    with pytest.raises(ValueError, match="offset"):
        export.export(tmp_path / "final", "compressed-tensors", tmp_path / "ct")
