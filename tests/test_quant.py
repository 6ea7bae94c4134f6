"""Quantizer math against explicit references: grids, qparams, STE and LSQ gradients, the fused linear, packing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from qat import quant

CASES = list(itertools.product([2, 3, 4, 8], [True, False], [-1, 32]))


def weight(out=16, inp=64, seed=0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def explicit_reference(w: torch.Tensor, bits: int, symmetric: bool, group: int) -> torch.Tensor:
    """Quantize → dequantize one group at a time, straight from the formulas in qat/quant.py's docstring."""
    out = torch.empty_like(w)
    g = w.shape[1] if group == -1 else group
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c : c + g]
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                s = x.abs().max() / (qmax + 0.5)
                z = torch.tensor(0.0)
            else:
                qmin, qmax = 0, 2**bits - 1
                lo, hi = min(x.min(), torch.tensor(0.0)), max(x.max(), torch.tensor(0.0))
                s = (hi - lo) / qmax
                z = torch.clamp(torch.round(-lo / s), qmin, qmax)
            q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
            out[r, c : c + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits,symmetric,group", CASES)
def test_fake_quantize_matches_explicit_reference(bits, symmetric, group):
    w = weight()
    n = quant.group_count(w.shape[1], group)
    s, z = quant.minmax_qparams(w, bits, n, symmetric)
    ref = explicit_reference(w, bits, symmetric, group)
    assert torch.equal(quant.fake_quantize(w, s, z, bits, symmetric), ref)
    assert torch.equal(quant.dequantize(quant.quantize(w, s, z, bits, symmetric), s, z), ref)


@pytest.mark.parametrize("bits,symmetric,group", CASES)
def test_at_most_2_pow_bits_levels_per_group(bits, symmetric, group):
    w = weight(8, 256)
    n = quant.group_count(w.shape[1], group)
    s, z = quant.minmax_qparams(w, bits, n, symmetric)
    w_hat = quant.grouped(quant.fake_quantize(w, s, z, bits, symmetric), n)
    codes = quant.grouped(quant.quantize(w, s, z, bits, symmetric), n)
    qmin, qmax = quant.int_range(bits, symmetric)
    assert codes.min() >= qmin and codes.max() <= qmax and torch.equal(codes, codes.round())
    for r, g in itertools.product(range(w_hat.shape[0]), range(n)):
        assert w_hat[r, g].unique().numel() <= 2**bits
    # Uniform weights reach every code (symmetric: all but qmin, see quant.py): no level of the grid is wasted.
    u = torch.rand(1, 4096, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s, z = quant.minmax_qparams(u, bits, 1, symmetric)
    assert quant.quantize(u, s, z, bits, symmetric).unique().numel() >= 2**bits - symmetric


def test_ste_gradient_is_the_in_range_mask():
    w = weight().requires_grad_()
    s, _ = quant.minmax_qparams(w, 3, 2, True, clip=0.6)  # clipping makes some codes saturate
    gout = torch.randn_like(w)
    quant.fake_quantize(w, s, None, 3, True).backward(gout)
    t = quant.grouped(w.detach(), 2) / s.unsqueeze(-1)
    inside = ((torch.round(t) >= -4) & (torch.round(t) <= 3)).view(w.shape)
    assert 0 < (~inside).sum() < inside.sum()
    assert torch.equal(w.grad == 0, ~inside)
    torch.testing.assert_close(w.grad, torch.where(inside, gout, 0.0))  # autograd computes gout · s · (1/s)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_scale_gradient_matches_formula(symmetric):
    bits, n = 4, 4
    w = weight()
    s0, z0 = quant.minmax_qparams(w, bits, n, symmetric, clip=0.7)
    s = s0.clone().requires_grad_()
    z = None if z0 is None else z0.clone().requires_grad_()
    gout = torch.randn_like(w)
    quant.fake_quantize(w, s, z, bits, symmetric, lsq=True).backward(gout)

    qmin, qmax = quant.int_range(bits, symmetric)
    t = quant.grouped(w, n) / s0.unsqueeze(-1)
    zz = 0.0 if z0 is None else z0.unsqueeze(-1)
    r = torch.round(t) + zz
    inside = (r >= qmin) & (r <= qmax)
    q_minus_z = r.clamp(qmin, qmax) - zz
    g = 1 / math.sqrt(w.shape[1] // n * qmax)
    d_s = torch.where(inside, q_minus_z - t, q_minus_z)  # LSQ: round(w/s) − w/s inside, qmin/qmax − z outside
    go = quant.grouped(gout, n)
    torch.testing.assert_close(s.grad, (go * d_s).sum(-1) * g, rtol=1e-5, atol=1e-6)
    if z is not None:
        d_z = torch.where(inside, 0.0, -s0.unsqueeze(-1))
        torch.testing.assert_close(z.grad, (go * d_z).sum(-1) * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "symmetric,lsq,bias",
    [(True, False, True), (False, False, False), (True, True, True), (False, True, True)],
)
def test_fused_linear_matches_reference_autograd(symmetric, lsq, bias):
    bits, n = 3, 2
    w0 = weight(24, 64)
    s0, z0 = quant.minmax_qparams(w0, bits, n, symmetric, clip=0.8)
    x0 = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    b0 = torch.randn(24) if bias else None

    def run(fused: bool):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        s = s0.clone().requires_grad_(lsq)
        z = None if z0 is None else z0.clone().requires_grad_(lsq)
        if fused:
            y = quant.fake_quant_linear(x, w, b, s, z, bits, symmetric)
        else:
            y = F.linear(x, quant.fake_quantize(w, s, z, bits, symmetric, lsq=lsq), b)
        y.pow(2).sum().backward()
        return y, [t.grad for t in (x, w, b, s, z) if t is not None and t.requires_grad]

    y_f, g_f = run(True)
    y_r, g_r = run(False)
    assert torch.equal(y_f, y_r)  # the forward is the same computation, bit for bit
    for a, b in zip(g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # same sums, another order


def test_mse_clipping_never_worse_than_minmax():
    w = weight(32, 128) * torch.linspace(0.1, 3, 128)  # outliers make clipping worthwhile
    for bits in (2, 3, 4):
        errs = []
        for find in (quant.minmax_qparams, quant.mse_qparams):
            s, z = find(w, bits, 1, True)
            errs.append((quant.grouped(w - quant.fake_quantize(w, s, z, bits, True), 1)).pow(2).sum(-1))
        assert (errs[1] <= errs[0]).all() and (errs[1] < errs[0]).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 1000, 4099])
def test_pack_roundtrip_and_size(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8) * bits
    assert torch.equal(quant.unpack(packed, bits, numel), codes)


def test_symmetric_int4_matches_torchao():
    """Parity with torchao's symmetric per-group int4 fake quant (same grid: s = max|w| / 7.5)."""
    pytest.importorskip("torchao")
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    w = weight(64, 256)
    fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True))
    s, _ = quant.minmax_qparams(w, 4, 8, True)
    ours, theirs = quant.fake_quantize(w, s, None, 4, True), fq(w)
    # Same scales; codes agree except at a group's extreme, where w/s = ±7.5 is a rounding tie that torchao
    # (multiplying by 1/s) and we (dividing by s) may break differently: one step apart, never elsewhere.
    assert torch.equal(fq.scale.view(-1), s.view(-1))
    differ = ours != theirs
    extreme = w.abs() == quant.grouped(w, 8).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(w.shape)
    assert not (differ & ~extreme).any()
    step = s.repeat_interleave(32, 1)
    torch.testing.assert_close((ours - theirs).abs()[differ], step[differ])
