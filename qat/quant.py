"""How fake quantization works: integer grids, scales, straight-through gradients, LSQ.

Grid. A b-bit weight quantizer maps each weight w to an integer code q in [qmin, qmax] and back:

    q = clamp(round(w / s) + z, qmin, qmax)          ŵ = (q − z) · s

  symmetric:  qmin = −2^(b−1), qmax = 2^(b−1) − 1, z = 0,      s = max|w| / (qmax + ½)
  asymmetric: qmin = 0,        qmax = 2^b − 1,     z ∈ [qmin, qmax] an integer,
              s = (max(w, 0) − min(w, 0)) / qmax,  z = round(−min(w, 0) / s)

The symmetric step s = 2·max|w| / (2^b − 1) is GPTQ's and torchao's (so their kernels and export formats
apply unchanged): w/s spans [qmin + ½, qmax + ½], the 2^b − 1 codes qmin+1..qmax carry the weights and
qmin is reached only by a weight at exactly −max|w| (round-half-to-even, torch.round). At 2 bits this is
{−1, 0, 1}·s with s = max|w|/1.5; use asymmetric grids for four real levels.

Groups. Scales are per output row and per group of `group_size` consecutive inputs: a weight [out, in]
is viewed as [out, in/g, g] with one s (and z) per [row, group]; `group_size = -1` means one group per row
(per-channel). Scales are stored as [out, in/g] in float32 whatever the weight dtype.

Initialisation (RTN). s and z come from the min/max of each group, optionally shrunk by a clipping ratio
α ∈ [0.5, 1] chosen per group to minimise Σ(w − ŵ)² (`mse=True`, a 21-point grid search).

Gradients. round has zero gradient almost everywhere, so training uses the straight-through estimator
(STE): ∂ŵ/∂w = 1 where the code was not clamped, 0 where it saturated ("clipped STE"). With learned step
sizes (LSQ, Esser et al. 2020) s is a parameter too and

    ∂ŵ/∂s = round(w/s) − w/s   inside the range,     qmin − z or qmax − z   where clamped,

scaled by g = 1/√(N·Qp) (N = weights sharing that scale, i.e. the group size; Qp = qmax) so that the step
size learns at a rate comparable to the weights. For a learned zero point (LSQ+), z is rounded in the
forward with an STE: ∂ŵ/∂z = 0 inside the range and −s where clamped.

Speed and memory. `fake_quant_linear` fuses fake quantization with the matmul in one autograd Function
that saves only (x, w, s, z) and recomputes ŵ in the backward: a fake-quantized linear then keeps no extra
weight-sized tensor alive between forward and backward (plain autograd would keep three). In the backward
the clipped-STE mask is one fused pass (hardtanh's gradient on the integer codes, written in place into
the weight gradient) instead of comparisons into a bool tensor: this took the 100M-parameter step from
1.19× to 1.03× a plain step on CPU (LOG.md). The pure autograd composition (`fake_quantize`) is kept as
the reference the fused path is tested against.

Not covered: activation quantization, non-uniform grids (NF4/NF3), per-tensor scales, float formats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MSE_GRID = torch.linspace(1.0, 0.5, 21).tolist()  # clipping ratios tried by the MSE search
SCALE_MIN = torch.finfo(torch.float32).tiny  # every scale is at least this (a zero step would divide by 0)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def group_count(in_features: int, group_size: int) -> int:
    g = in_features if group_size == -1 else group_size
    if in_features % g:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return in_features // g


def grouped(w: Tensor, n_groups: int) -> Tensor:
    """[out, in] → [out, n_groups, in / n_groups] (a view)."""
    return w.view(w.shape[0], n_groups, -1)


def minmax_qparams(
    w: Tensor, bits: int, n_groups: int, symmetric: bool, clip: Tensor | float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) [out, n_groups] in float32 from each group's range shrunk by `clip`."""
    wg = grouped(w.detach(), n_groups).float()
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        scale = wg.abs().amax(-1) * clip / (qmax + 0.5)
        return scale.clamp_min(SCALE_MIN), None
    lo = wg.amin(-1).clamp_max(0) * clip
    hi = wg.amax(-1).clamp_min(0) * clip
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_MIN)
    zero = torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero


def mse_qparams(w: Tensor, bits: int, n_groups: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Per-group clipping ratio from MSE_GRID minimising the squared quantization error."""
    best = None
    for ratio in MSE_GRID:
        s, z = minmax_qparams(w, bits, n_groups, symmetric, ratio)
        err = (
            (grouped(w.detach().float() - dequantize(quantize(w, s, z, bits, symmetric), s, z), n_groups))
            .pow(2)
            .sum(-1)
        )
        if best is None:
            best, best_s, best_z = err, s, z
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = None if z is None else torch.where(better, z, best_z)
    return best_s, best_z


def rtn_qparams(
    w: Tensor, bits: int, n_groups: int, symmetric: bool, mse: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The RTN initialisation every path uses (prepare, GPTQ's static groups, AWQ's trials): min/max, or
    MSE-clipped when `mse`."""
    return (mse_qparams if mse else minmax_qparams)(w, bits, n_groups, symmetric)


def _expand(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.unsqueeze(-1)


def _codes(wg: Tensor, s: Tensor, z: Tensor | None) -> Tensor:
    """round(w/s) + z, unclamped, float32. The one place rounding happens: every path goes through it."""
    r = torch.div(wg, s).round_()
    return r if z is None else r.add_(z)


def quantize(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """Integer codes q (as float32 holding integers), shape of w."""
    qmin, qmax = int_range(bits, symmetric)
    n = scale.shape[-1]
    return _codes(grouped(w.detach(), n), scale.unsqueeze(-1), _expand(zero)).clamp_(qmin, qmax).view(w.shape)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """ŵ = (q − z)·s in float32, shape of q."""
    qg = grouped(q.float(), scale.shape[-1])
    if zero is not None:
        qg = qg - zero.unsqueeze(-1)
    return (qg * scale.unsqueeze(-1)).view(q.shape)


def _fake_quant_weight(w: Tensor, s: Tensor, z: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """ŵ in float32 with no autograd graph, in place on one buffer (same ops as dequantize(quantize(·)))."""
    q = _codes(grouped(w, s.shape[-1]), s.unsqueeze(-1), _expand(z)).clamp_(qmin, qmax)
    if z is not None:
        q = q.sub_(z.unsqueeze(-1))
    return q.mul_(s.unsqueeze(-1)).view(w.shape)


def round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def scale_grad(x: Tensor, g: float) -> Tensor:
    """Value x exactly (x + 0), gradient multiplied by g."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def lsq_grad_scale(bits: int, symmetric: bool, group_len: int) -> float:
    return 1.0 / math.sqrt(group_len * int_range(bits, symmetric)[1])


def fake_quantize(
    w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool, lsq: bool = False
) -> Tensor:
    """Reference fake quantization by plain autograd: STE through round, clipped by clamp.

    With lsq=True, gradients reach `scale` (and `zero`) with LSQ's gradient scaling. Returns ŵ in w's dtype.
    """
    qmin, qmax = int_range(bits, symmetric)
    wg = grouped(w, scale.shape[-1]).float()
    s = scale.unsqueeze(-1)
    z = _expand(zero)
    if lsq:
        g = lsq_grad_scale(bits, symmetric, wg.shape[-1])
        s = scale_grad(s, g)
        z = None if z is None else scale_grad(round_ste(z), g)
    q = round_ste(wg / s)
    if z is not None:
        q = torch.clamp(q + z, qmin, qmax) - z
    else:
        q = torch.clamp(q, qmin, qmax)
    return (q * s).view(w.shape).to(w.dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear runs in: the autocast dtype when autocast is on, else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """F.linear in the compute dtype, with explicit casts (no autocast inside): shared by the fake-quant and
    the converted paths so that they compute bit-identical outputs."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) and w.dtype == x.dtype and (b is None or b.dtype == x.dtype):
        return F.linear(x, w, b)  # nothing to cast: skip the context manager (a per-call cost in small models)
    dt = compute_dtype(x)
    with torch.autocast(dev, enabled=False):
        return F.linear(x.to(dt), w.to(dt), None if b is None else b.to(dt))


class _FakeQuantLinear(torch.autograd.Function):
    """y = x ŵᵀ + b with ŵ = fake_quantize(w); saves (x, w, s, z), recomputes ŵ in the backward."""

    @staticmethod
    def forward(ctx, x, w, b, s, z, bits, symmetric, lsq_g):
        qmin, qmax = int_range(bits, symmetric)
        w_hat = _fake_quant_weight(w, s, z, qmin, qmax).to(w.dtype)
        ctx.save_for_backward(x, w, b, s, z)
        ctx.meta = (qmin, qmax, lsq_g)
        return linear(x, w_hat, b)

    @staticmethod
    def backward(ctx, gy):
        x, w, b, s, z = ctx.saved_tensors
        qmin, qmax, lsq_g = ctx.meta
        n = s.shape[-1]
        r = _codes(grouped(w, n), s.unsqueeze(-1), _expand(z))  # unclamped codes, float32
        lsq = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dt = gy.dtype
        gx = gw = gb = gs = gz = None
        with torch.autocast(gy.device.type, enabled=False):
            g2 = gy.reshape(-1, gy.shape[-1])
            if ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(b.dtype)
            if ctx.needs_input_grad[1] or lsq:
                gw_hat = grouped((g2.t() @ x.reshape(-1, x.shape[-1]).to(dt)).float(), n)
            if ctx.needs_input_grad[1]:
                # Clipped STE: pass the gradient where qmin ≤ r ≤ qmax. r holds integers, so hardtanh's strict
                # bounds at ±½ beyond the grid select exactly those codes, in one fused pass with no bool mask.
                mask = torch.ops.aten.hardtanh_backward.grad_input
                out = gw_hat if not lsq else torch.empty_like(gw_hat)  # in place unless LSQ still needs gw_hat
                gw = mask(gw_hat, r, qmin - 0.5, qmax + 0.5, grad_input=out).view(w.shape).to(w.dtype)
            if lsq:
                # ∂ŵ/∂s = (q − z) − w/s inside, (q − z) where clamped; ∂ŵ/∂z = −s where clamped.
                inside = (r >= qmin) & (r <= qmax)
                q_minus_z = r.clamp(qmin, qmax)
                if z is not None:
                    q_minus_z = q_minus_z.sub_(z.unsqueeze(-1))
                if ctx.needs_input_grad[3]:
                    t = torch.div(grouped(w, n), s.unsqueeze(-1))
                    gs = (gw_hat * torch.where(inside, q_minus_z - t, q_minus_z)).sum(-1) * lsq_g
                if ctx.needs_input_grad[4]:
                    gz = -(torch.where(inside, 0.0, gw_hat) * s.unsqueeze(-1)).sum(-1) * lsq_g
            if ctx.needs_input_grad[0]:  # ŵ rebuilt in place from r (same ops as the forward)
                q = r.clamp_(qmin, qmax)
                if z is not None:
                    q = q.sub_(z.unsqueeze(-1))
                w_hat = q.mul_(s.unsqueeze(-1)).view(w.shape).to(w.dtype)
                gx = (gy @ w_hat.to(dt)).to(x.dtype)
        return gx, gw, gb, gs, gz, None, None, None


def fake_quant_linear(
    x: Tensor, w: Tensor, b: Tensor | None, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool
) -> Tensor:
    """F.linear(x, fake_quantize(w), b), fused; gradients as in `fake_quantize` (LSQ when scale requires grad)."""
    lsq_g = lsq_grad_scale(bits, symmetric, w.shape[1] // scale.shape[-1])
    if zero is not None and zero.requires_grad:
        zero = round_ste(zero)  # the grid stays integer; the gradient passes to the float zero point
    return _FakeQuantLinear.apply(x, w, b, scale, zero, bits, symmetric, lsq_g)


def quant_error(w: Tensor, w_hat: Tensor) -> tuple[float, float]:
    """(Σ|w − ŵ|, Σ|w|) for a relative-error statistic summed over layers."""
    w = w.detach().float()
    return (w - w_hat.float()).abs().sum().item(), w.abs().sum().item()


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (< 2^bits) into a flat uint8 tensor, little-endian bit order, 8 codes → `bits` bytes."""
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    flat = F.pad(flat, (0, pad)).view(-1, 8)
    word = (flat << (torch.arange(8, device=flat.device) * bits)).sum(-1)  # up to 64 bits; wraps safely for bits = 8
    out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], -1)
    return out.to(torch.uint8).reshape(-1)


def pack_codes(codes: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Integer codes of a `bits`-bit grid (signed when symmetric) → the artifact's packing of `pack`."""
    return pack((codes.to(torch.int64) - int_range(bits, symmetric)[0]).to(torch.uint8), bits)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack`: the first `numel` codes as uint8."""
    by = packed.to(torch.int64).view(-1, bits)
    word = (by << (torch.arange(bits, device=by.device) * 8)).sum(-1)
    codes = (word.unsqueeze(-1) >> (torch.arange(8, device=by.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
