"""GPTQ against RTN and against a plain float64 reference (explicit inverse, OBS downdates, no blocks)."""

from __future__ import annotations

import logging

import pytest
import torch

from qat import quant
from qat.config import QuantConfig
from qat.modules import WeightQuantizer
from qat.ptq.gptq import GPTQResult, accumulate_hessian, gptq_quantize, gptq_solve


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def calib(n: int, d: int, seed: int = 0, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Correlated activations: mixed Gaussian sources, a few outlier channels, optional never-active channels."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d))
    x[:, :: d // 4] *= 8.0  # outlier channels, as in real LLM activations
    x[:, list(dead)] = 0.0
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return (2.0 / x.shape[0]) * x.T @ x


def output_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x.double() @ (w.double() - q.double()).T).square().sum())


def rtn(w: torch.Tensor, res: GPTQResult, cfg: QuantConfig) -> torch.Tensor:
    return quant.dequantize(quant.quantize(w, res.scale, res.zero, cfg.bits, cfg.symmetric), res.scale, res.zero)


def codes(w: torch.Tensor, res: GPTQResult, cfg: QuantConfig) -> torch.Tensor:
    return quant.quantize(w, res.scale, res.zero, cfg.bits, cfg.symmetric)


def reference_gptq(w, h, cfg, scale, zero, damp, act_order) -> tuple[torch.Tensor, float]:
    """The algorithm as written in the paper, in float64: one column at a time, H⁻¹ downdated explicitly.

    Only the rounding runs in float32: the grid is defined by float32 scales, and a weight at exactly ±max|w|
    (w/s = ±(qmax + ½), a tie) must break the same way as in the quantizer.
    """
    W, H = w.double().clone(), h.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    n = W.shape[1]
    col_s = scale.repeat_interleave(n // scale.shape[1], 1)
    col_z = torch.zeros_like(col_s) if zero is None else zero.repeat_interleave(n // scale.shape[1], 1)
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    W, H, col_s, col_z = W[:, order], H[order][:, order], col_s[:, order], col_z[:, order]
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    qmin, qmax = quant.int_range(cfg.bits, cfg.symmetric)
    Q, loss = torch.zeros_like(W), 0.0
    for i in range(n):
        w_i, s, z, d = W[:, i], col_s[:, i], col_z[:, i], Hinv[i, i]
        q = ((torch.clamp(torch.round(w_i.float() / s) + z, qmin, qmax) - z) * s).double()
        Q[:, i] = q
        loss += float((w_i - q).square().sum() / d / 2)
        W[:, i + 1 :] -= torch.outer((w_i - q) / d, Hinv[i, i + 1 :])  # OBS: free columns absorb the error
        Hinv -= torch.outer(Hinv[:, i], Hinv[i, :]) / d  # eliminate column i from the inverse
    return Q[:, torch.argsort(order)], loss


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group", [128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_beats_rtn_on_correlated_inputs(bits, group, symmetric):
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    w = torch.randn(64, 256, generator=gen(1))
    x = calib(1024, 256, seed=2)
    res = gptq_solve(w, hessian(x), cfg)
    plain = gptq_solve(w, hessian(x), cfg, act_order=False)
    e_gptq, e_plain, e_rtn = (output_err(x, w, q) for q in (res.weight, plain.weight, rtn(w, res, cfg)))
    # measured: ≈ 0.32 (act-order) and ≈ 0.50 (natural order) of RTN's error on these inputs
    assert e_gptq < e_plain < 0.8 * e_rtn, (e_gptq, e_plain, e_rtn)


@pytest.mark.parametrize(
    "bits, group, symmetric, act_order",
    [(4, 16, True, False), (4, 16, True, True), (4, 16, False, False), (3, 16, False, True), (3, -1, True, True)],
)
def test_matches_plain_reference(bits, group, symmetric, act_order):
    cfg = QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    w = torch.randn(24, 64, generator=gen(3))
    h = hessian(calib(256, 64, seed=4, dead=(5, 40)))
    res = gptq_solve(w, h, cfg, block_size=24, act_order=act_order)  # 24: blocks straddle groups, ragged tail
    ref, ref_loss = reference_gptq(w, h, cfg, res.scale, res.zero, 0.01, act_order)
    assert torch.equal(codes(res.weight, res, cfg), codes(ref.float(), res, cfg))
    torch.testing.assert_close(res.weight, ref.float(), rtol=1e-6, atol=1e-6)
    assert res.loss == pytest.approx(ref_loss, rel=1e-4)
    # the increments sum to the final objective ½ Σ_rows (w − q) H_damped (w − q)ᵀ (dead columns: w is 0 there)
    w_live = w.double().clone()
    w_live[:, h.diagonal() == 0] = 0
    h_d = h.double().clone()
    h_d.diagonal()[h.diagonal() == 0] = 1.0
    h_d += 0.01 * h_d.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    delta = w_live - res.weight.double()
    assert res.loss == pytest.approx(float((delta @ h_d * delta).sum() / 2), rel=1e-4)
    assert torch.equal(gptq_quantize(w, h, cfg, block_size=24, act_order=act_order), res.weight)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mse", [False, True])
def test_act_order_keeps_static_grouped_grid(symmetric, mse):
    cfg = QuantConfig(bits=4, group_size=32, symmetric=symmetric, mse=mse)
    w = torch.randn(16, 128, generator=gen(5))
    res = gptq_solve(w, hessian(calib(512, 128, seed=6)), cfg, block_size=48, act_order=True)
    init = WeightQuantizer(16, 128, cfg)
    init.init_from(w)
    assert torch.equal(res.scale, init.scale)
    assert (res.zero is None) if symmetric else torch.equal(res.zero, init.zero_point)
    assert res.weight.dtype == torch.float32 and res.weight.shape == w.shape
    assert torch.equal(quant.dequantize(codes(res.weight, res, cfg), res.scale, res.zero), res.weight)
    assert not torch.equal(res.weight, rtn(w, res, cfg))  # GPTQ moved some codes
    # the latent (pre-rounding, error-compensated) values round to exactly the solution's codes
    assert torch.equal(codes(res.latent, res, cfg), codes(res.weight, res, cfg))
    assert not torch.equal(res.latent, res.weight) and not torch.equal(res.latent, w)


def test_given_grid_is_used_exactly():
    cfg = QuantConfig(bits=3, group_size=32, symmetric=False)
    w = torch.randn(16, 128, generator=gen(7))
    s, z = quant.minmax_qparams(w, 3, 4, False, clip=0.7)
    z_frac = z + 0.2  # a learned, non-integer zero point: rounded, as WeightQuantizer.codes does
    res = gptq_solve(w, hessian(calib(512, 128, seed=8)), cfg, scale=s, zero=z_frac)
    assert torch.equal(res.scale, s) and torch.equal(res.zero, z) and res.scale is not s
    assert torch.equal(quant.dequantize(quant.quantize(res.weight, s, z, 3, False), s, z), res.weight)


def test_failed_cholesky_recovers_by_dampening(caplog):
    cfg = QuantConfig(bits=4, group_size=32, symmetric=True)
    w = torch.randn(16, 64, generator=gen(9))
    h = hessian(calib(16, 64, seed=10))  # 16 tokens for 64 inputs: rank 16
    h -= 0.005 * h.diagonal().mean() * torch.eye(64)  # now indefinite: 48 eigenvalues at −0.5 % of mean(diag)
    with caplog.at_level(logging.WARNING, logger="qat.ptq.gptq"):
        res = gptq_solve(w, h, cfg, damp=1e-4)
    assert res.damp == pytest.approx(1e-2)  # 1e-4 and 1e-3 cannot cover −0.5 %, 1e-2 can
    assert torch.isfinite(res.weight).all() and res.loss == res.loss
    assert sum("not positive definite" in r.getMessage() for r in caplog.records) == 2
    singular = hessian(calib(16, 64, seed=10))  # rank 16, no dampening asked: ×10 of 0 is 0, so it starts at 1e-4
    assert gptq_solve(w, singular, cfg, damp=0.0).damp == pytest.approx(1e-4)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        gptq_solve(w, -torch.eye(64), cfg)  # no dampening fixes a negative definite matrix


def test_dead_inputs_and_hessian_scale_invariance():
    cfg = QuantConfig(bits=4, group_size=32, symmetric=False)
    w = torch.randn(16, 128, generator=gen(11))
    dead = (0, 3, 77)
    x = calib(512, 128, seed=12, dead=dead)
    h = hessian(x)
    res = gptq_solve(w, h, cfg, block_size=32)
    assert torch.isfinite(res.weight).all() and (res.weight[:, list(dead)] == 0).all()
    assert output_err(x, w, res.weight) < output_err(x, w, rtn(w, res, cfg))
    # damping is relative: a power-of-two scale changes no rounding at all, 10·H only float noise
    assert torch.equal(gptq_solve(w, 4 * h, cfg, block_size=32).weight, res.weight)
    res10 = gptq_solve(w, 10 * h, cfg, block_size=32)
    assert (codes(res10.weight, res, cfg) != codes(res.weight, res, cfg)).float().mean() < 0.01
    assert res10.loss == pytest.approx(10 * res.loss, rel=1e-3)


def test_accumulate_hessian_in_chunks():
    x = torch.randn(2, 5, 32, generator=gen(13))
    y = torch.randn(3, 32, generator=gen(14)).to(torch.bfloat16)
    h, n = accumulate_hessian(None, x, 0)
    h, n = accumulate_hessian(h, y, n)
    h, n = accumulate_hessian(h, y[:0], n)  # an empty batch changes nothing
    flat = torch.cat([x.reshape(-1, 32), y.float()]).double()
    assert n == 13 and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), 2.0 / 13 * flat.T @ flat, rtol=1e-6, atol=1e-6)


def test_rejects_bad_inputs():
    cfg = QuantConfig(bits=4, group_size=32, symmetric=True)
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_solve(w, torch.eye(32), cfg)
    with pytest.raises(ValueError, match="scale must be"):
        gptq_solve(w, h, cfg, scale=torch.ones(8, 1))
    with pytest.raises(ValueError, match="needs no zero point"):
        gptq_solve(w, h, cfg, scale=torch.ones(8, 2), zero=torch.zeros(8, 2))
    with pytest.raises(ValueError, match="non-finite"):
        gptq_solve(w, h * float("nan"), cfg)
