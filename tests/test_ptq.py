"""The PTQ pipeline from recipes: calibration windows, sequential GPTQ/AWQ/mixed precision on both tiny families,
artifacts, and QAT starting exactly from the PTQ solution."""

from __future__ import annotations

import json

import pytest
import torch

from qat import quant, train
from qat.config import RecipeError, load_recipe
from qat.models import load
from qat.modules import FakeQuantLinear, QuantizedLinear
from qat.ptq.calibrate import calibration_ids
from qat.ptq.pipeline import quantize_model
from tests.conftest import ROOT

CALIB = ["data.max_docs=4", "quant.calib_samples=6", "quant.calib_seq_len=64", "quant.calib_batch=4",
         "train.seq_len=64", "train.batch_size=2", "train.save_every=0"]  # fmt: skip
FAMILIES = {"qwen3": ["recipe=micro_qwen3_int4", f"model.path={ROOT / 'checkpoints/micro-qwen3'}"],
            "coda": ["recipe=micro_coda_int4", f"model.path={ROOT / 'checkpoints/micro-coda'}"]}  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def recipe(family: str, *extra: str):
    return load_recipe([*FAMILIES[family], *CALIB, *extra])


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_calibration_windows_are_noised_for_diffusion_only(family):
    r = recipe(family)
    model, tok = load(r.model.path)
    x = calibration_ids(r, tok, model.config)
    assert x.shape == (6, 64)
    mask = model.config.mask_token_id if family == "coda" else tok.mask_token_id
    rates = (x == mask).float().mean(1)
    if family == "coda":  # window i has ratio calib_ratios[i mod 5]
        want = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.1])
        assert ((rates - want).abs() < 0.2).all() and rates[4] > rates[0]
    else:
        assert rates.sum() == 0
    clean = calibration_ids(recipe(family, "quant.calib_mask=none"), tok, model.config)
    assert not (clean == mask).any()


@pytest.mark.parametrize("family", ["qwen3", "coda"])
@pytest.mark.parametrize("init", ["rtn", "gptq", "awq"])
def test_steps0_artifacts_load_and_run(tmp_path, family, init):
    final = train.main([*FAMILIES[family], *CALIB, f"out_dir={tmp_path}", "train.steps=0", f"quant.init={init}"])
    model, _ = load(final)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids()).logits).all()
    if init != "rtn":
        report = json.loads((tmp_path / "ptq.json").read_text())
        assert report["method"] == init and len(report["layers"]) == 2


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_gptq_beats_rtn_per_layer(family):
    r = recipe(family, "quant.init=gptq", "quant.bits=3", "quant.group_size=-1")
    model, tok = load(r.model.path)
    result = quantize_model(model, tok, r, progress=False)
    for layer in result.layers:
        assert layer.error <= layer.rtn_error * 1.05, layer  # sequential GPTQ, measured on its own inputs
    assert sum(x.error for x in result.layers) < sum(x.rtn_error for x in result.layers)


def test_qat_starts_exactly_at_the_gptq_solution(tmp_path):
    """The prepared model keeps the solution's grid as quantizer state: it equals the PTQ artifact bit for bit,
    its scales are the RTN scales of the ORIGINAL weights, and its weights are GPTQ's (not RTN's)."""
    extra = ["quant.init=gptq", "quant.bits=3", "quant.symmetric=false"]
    r = recipe("qwen3", *extra)
    model, tok = load(r.model.path)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    quantize_model(model, tok, r, progress=False)
    final = train.main([*FAMILIES["qwen3"], *CALIB, *extra, f"out_dir={tmp_path}", "train.steps=0"])
    ptq, _ = load(final)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, ptq(input_ids=ids()).logits)
    moved = 0
    for n, m in model.named_modules():
        if isinstance(m, FakeQuantLinear):
            wq = m.weight_quantizer
            s, z = quant.minmax_qparams(original[n], 3, wq.n_groups, symmetric=False)
            assert torch.equal(wq.scale, s) and torch.equal(wq.zero_point, z), n
            codes = quant.quantize(m.weight.float(), s, z, 3, False)
            unclamped = torch.round(quant.grouped(m.weight.float(), wq.n_groups) / s.unsqueeze(-1)) + z.unsqueeze(-1)
            assert unclamped.min() >= 0 and unclamped.max() <= 7, n  # inside the range: the STE passes gradients
            # the latent weight is GPTQ's pre-rounding value: it rounds to the solution but is not on the grid
            assert not torch.equal(quant.dequantize(codes, s, z), m.weight.float()), n
            rtn = quant.quantize(original[n], s, z, 3, False)
            moved += int((rtn != codes).sum())
    assert moved > 0  # GPTQ moved weights off their nearest grid points


@pytest.mark.parametrize(
    "extra",
    [["quant.init=awq", "quant.bits=3", "quant.symmetric=false"],
     ["quant.init=gptq", "quant.bits=3.5", "quant.mixed_choices=[2,3,4]"],
     ["quant.init=rtn", "quant.bits=3.5", "quant.skip=['*embed*']"],  # lm_head quantized, inside the bit budget
     ["quant.init=awq", "quant.bits=2.5", "quant.mixed_choices=[2,3]", "quant.symmetric=false"]],
    ids=["awq", "mixed-gptq", "mixed-rtn-lm_head", "mixed-awq"],
)  # fmt: skip
@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_step0_prepared_model_is_the_ptq_artifact(tmp_path, family, extra):
    """QAT at step 0 computes exactly the PTQ model it starts from, bit for bit, for every initialisation."""
    r = recipe(family, *extra)
    model, tok = load(r.model.path)
    result = quantize_model(model, tok, r, progress=False)
    final = train.main([*FAMILIES[family], *CALIB, *extra, f"out_dir={tmp_path}", "train.steps=0"])
    ptq, _ = load(final)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, ptq(input_ids=ids()).logits)
    if result.bits:  # mixed precision: the allocation meets the budget over every quantized linear
        sizes = result.sizes
        assert set(result.bits) == {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        avg = sum(sizes[n] * b for n, b in result.bits.items()) / sum(sizes[n] for n in result.bits)
        assert avg <= r.quant.bits


def test_gptq_init_then_qat_steps(tmp_path):
    final = train.main([*FAMILIES["coda"], *CALIB, f"out_dir={tmp_path}", "train.steps=2", "quant.init=gptq",
                        "train.kd=0.5", "train.kd_teacher=frozen"])  # fmt: skip
    assert (final / "model.safetensors").is_file()


def test_gptq_with_self_teacher_is_refused():
    with pytest.raises(RecipeError, match="kd_teacher=frozen"):
        recipe("qwen3", "quant.init=gptq", "train.kd=0.5")


def test_mixed_precision_meets_the_budget_and_is_saved(tmp_path):
    final = train.main([*FAMILIES["qwen3"], *CALIB, f"out_dir={tmp_path}", "train.steps=0", "quant.bits=3.5",
                        "quant.mixed_choices=[3,4]", "quant.group_size=-1"])  # fmt: skip
    modules = json.loads((final / "quantization.json").read_text())["modules"]
    model, _ = load(final)
    sizes = {n: m.in_features * m.out_features for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    avg = sum(sizes[n] * modules[n]["bits"] for n in modules) / sum(sizes.values())
    assert {m["bits"] for m in modules.values()} == {3, 4} and 3.4 <= avg <= 3.5
    assert all(model.get_submodule(n).bits == m["bits"] for n, m in modules.items())
    report = json.loads((tmp_path / "ptq.json").read_text())
    assert report["bits"] == {n: m["bits"] for n, m in modules.items()}
