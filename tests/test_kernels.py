"""Integer kernels in QuantizedLinear (qat/kernels.py): every path against the fake-quant reference, the int4
layout round trip, the state dict unchanged by the kernels' layouts, the measured choice, meta-device loading."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from qat import kernels
from qat.config import QuantConfig
from qat.modules import FakeQuantLinear, QuantizedLinear

# (bits, group_size, symmetric) → the kernel path that applies on CPU
CASES = [(4, 32, True, "int4"), (4, 64, False, "int4"), (4, 128, True, "int4"), (4, -1, False, "int4"),
         (8, -1, True, "int8")]  # fmt: skip


def layer(bits: int, group_size: int, symmetric: bool, n_in: int = 256, n_out: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=True)
    fq = FakeQuantLinear.from_linear(lin, QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    if not symmetric:  # zero points off the grid's middle, as trained ones are
        fq.weight_quantizer.zero_point.add_(torch.randint(-2, 3, fq.weight_quantizer.zero_point.shape))
    return fq, QuantizedLinear.from_fake_quant(fq)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("bits,group_size,symmetric,path", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_the_fake_quant_model(bits, group_size, symmetric, path, dtype):
    fq, q = layer(bits, group_size, symmetric)
    assert kernels.kernel(bits, group_size, symmetric, 96, 256, torch.device("cpu")) == path
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        ref = nn.functional.linear(x.to(dtype), fq.weight_quantizer(fq.weight).to(dtype), fq.bias.to(dtype))
        q.dtype, q.path = dtype, path
        y = q(x.to(dtype))
        q.path = "dense"
        dense = q(x.to(dtype))
        q.path = "dequant"
        dequant = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    assert torch.equal(dense, ref) and torch.equal(dequant, ref)  # both dequantizing paths are the reference
    # kernels: float32 reassociation; bfloat16 also rounds the scales and offsets to 8 bits of mantissa
    assert rel_error(y, ref) < (1e-5 if dtype == torch.float32 else 2e-2), rel_error(y, ref)
    assert q.held == path  # the dense weight was dequantized from the kernel's layout, which stays


@pytest.mark.parametrize("shape", [(16, 64), (48, 256), (2048, 128), (32, 384)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_layout_round_trips(shape, symmetric):
    lo, hi = (-8, 7) if symmetric else (0, 15)
    codes = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(0))
    packed = kernels.int4_pack(codes, symmetric)
    assert packed.numel() * 2 == codes.numel()  # one copy of the codes, 4 bits each
    assert torch.equal(kernels.int4_unpack(packed, *shape, symmetric).long(), codes)


@pytest.mark.parametrize("bits,group_size,symmetric,path", CASES)
def test_state_dict_keeps_the_artifact_layout(bits, group_size, symmetric, path):
    _, q = layer(bits, group_size, symmetric)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.path = path
    with torch.no_grad():
        q(torch.randn(3, 256))
    assert q.held == path and q.qweight.numel() <= before["qweight"].numel()  # re-laid out in place, not copied
    after = q.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fresh = QuantizedLinear(256, 96, bits, group_size, symmetric, bias=True)
    fresh.load_state_dict(after)
    assert torch.equal(fresh.codes(), q.codes())


def test_moving_or_casting_returns_to_the_artifact_layout():
    fq, q = layer(4, 64, True)
    q.path = "int4"
    x = torch.randn(4, 256)
    with torch.no_grad():
        q(x)
        assert q.held == "int4"
        q.to(torch.float32)
        assert q.held == "packed"
        assert rel_error(q(x), fq(x)) < 1e-5


def test_a_path_that_cannot_compute_the_layer_is_refused():
    _, q = layer(3, 64, False)
    q.path = "int4"
    with pytest.raises(ValueError, match="int4.*cannot compute"):
        q(torch.randn(2, 256))


def test_choice_is_measured_once_per_key_and_picks_the_fastest():
    kernels.forget()
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)

    def fast():
        calls["fast"] += 1

    key = ("test", 1)
    assert kernels.choose(key, {"slow": slow, "fast": fast}) == "fast"
    assert calls == {"slow": 1 + kernels.TIMING_CALLS, "fast": 1 + kernels.TIMING_CALLS}
    assert kernels.choose(key, {"slow": slow, "fast": fast}) == "fast"  # remembered: nothing runs again
    assert calls["slow"] == 1 + kernels.TIMING_CALLS
    assert kernels.decisions()[key] == "fast"
    kernels.forget()


@pytest.mark.parametrize("mode,alternative", [("auto", "dense"), ("lean", "dequant")])
def test_auto_and_lean_pick_a_path_per_token_bucket(monkeypatch, mode, alternative):
    monkeypatch.setenv("QAT_KERNELS", mode)
    kernels.forget()
    fq, q = layer(4, 64, True)
    x1, x64 = torch.randn(1, 256), torch.randn(64, 256)
    with torch.no_grad():
        for x in (x1, x64):
            assert rel_error(q(x), fq(x)) < 1e-5
    made = {k[-1]: v for k, v in kernels.decisions().items() if k[2:4] == (96, 256)}
    assert set(made) == {kernels.bucket(1), kernels.bucket(64)} and set(made.values()) <= {"int4", alternative}
    assert (q._dense is not None) == ("dense" in made.values())  # a dense copy only where it won (never if lean)
    _, q3 = layer(3, 64, False)  # no kernel: the dequantized weight, cached unless lean
    with torch.no_grad():
        q3(x1)
    assert q3.last_path == alternative and (q3._dense is not None) == (mode == "auto")
    kernels.forget()


def test_bucket():
    assert [kernels.bucket(n) for n in (1, 2, 3, 4, 5, 100, 10**6)] == [1, 2, 4, 4, 8, 128, 4096]


def test_artifact_loads_on_meta_skeleton_with_tied_weights(tmp_path):
    from qat import train
    from qat.models import load
    from tests.test_ptq import CALIB, FAMILIES

    final = train.main([*FAMILIES["qwen3"], *CALIB, f"out_dir={tmp_path}", "train.steps=0", "quant.bits=4",
                        "quant.group_size=32"])  # fmt: skip
    model, _ = load(final)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_int4_kernel_holds_a_per_group_offset():
    """A QA-LoRA merge's float offset per group (qat/lora.py) rides in tinygemm's own offset term."""
    _, q = layer(4, 64, False)
    q.offset = torch.randn(96, 4) * 0.01
    x = torch.randn(3, 256)
    with torch.no_grad():
        q.path = "dense"
        ref = q(x)
        q.path = "int4"
        assert rel_error(q(x), ref) < 1e-5
    assert kernels.kernel(8, -1, True, 96, 256, torch.device("cpu"), offset=True) is None  # int8 has no offset
