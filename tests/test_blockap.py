"""Block-wise reconstruction (qat/blockap.py): each layer moves toward the float layer on float inputs, the teacher
is untouched, and the trainer runs it after the step-0 validation and not again on resume."""

from __future__ import annotations

import copy

import pytest
import torch

from qat import blockap, train
from qat.models import load
from qat.modules import FakeQuantLinear
from qat.ptq.calibrate import calibration_ids
from qat.ptq.pipeline import quantize_model
from tests.test_ptq import CALIB, FAMILIES, ids, recipe


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_reconstruction_lowers_every_layers_error_and_leaves_the_teacher(family):
    r = recipe(family, "quant.init=rtn", "quant.bits=2", "quant.symmetric=false", "quant.group_size=32",
               "quant.scales=lsq")  # fmt: skip
    model, tok = load(r.model.path)
    model.float()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    quantize_model(model, tok, r, progress=False)
    latent = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    calib = calibration_ids(r, tok, model.config)
    with torch.no_grad():
        ref = teacher(input_ids=calib).logits
        ptq_error = (model(input_ids=calib).logits - ref).pow(2).mean()
    reports = blockap.reconstruct(model, teacher, calib, steps=30, lr=1e-3, batch_size=2,
                                  groups=lambda layer: train.param_groups(layer, 0.0, 0.1), progress=False)
    assert len(reports) == len(model.model.layers)
    for rep in reports:
        assert rep.after < rep.before, rep
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(m.weight, latent[n]) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear))
    with torch.no_grad():  # and closer to the float model end to end, too
        assert (model(input_ids=calib).logits - ref).pow(2).mean() < ptq_error
    assert all(p.grad is None for p in model.parameters())  # nothing left behind for the trainer's optimizer


def test_trainer_runs_it_after_the_ptq_validation_and_not_on_resume(tmp_path, capsys):
    args = [*FAMILIES["qwen3"], *CALIB, f"out_dir={tmp_path}", "quant.init=gptq", "quant.bits=2",
            "quant.symmetric=false", "quant.group_size=32", "train.kd=1", "train.kd_teacher=frozen",
            "train.block_ap_steps=3", "train.steps=2", "train.save_every=1", "train.eval_every=1",
            "train.eval_rows=2", "data.max_docs=4"]  # fmt: skip
    train.main([*args, "train.stop_after=1"])
    first = capsys.readouterr().out
    assert "block-wise reconstruction: 3 steps per layer" in first
    assert "validation after block-wise reconstruction" in first
    final = train.main([*args, "train.resume=auto"])
    second = capsys.readouterr().out
    assert "resumed from" in second and "block-wise reconstruction" not in second
    model, _ = load(final)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids()).logits).all()


def test_block_ap_lr_must_be_positive():
    from qat.config import RecipeError

    with pytest.raises(RecipeError, match="block_ap_lr"):
        recipe("qwen3", "train.block_ap_lr=0")
