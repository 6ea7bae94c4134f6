"""GPTQ (Frantar et al. 2022): quantize a linear layer column by column, folding each rounding error into the
columns not yet quantized, so that the layer's *output* on calibration data moves as little as possible.

Objective. For a weight W [out, in] and calibration inputs X [N, in], find Q on the quantizer grid minimising

    ‖X Wᵀ − X Qᵀ‖²  =  Σ_rows (w − q) H (w − q)ᵀ · N/2,        H = (2/N) Σ_tokens x xᵀ   [in, in]

Every row sees the same H, so all rows are solved at once, one input column at a time.

OBS step. Quantize column i (q_i = grid(w_i)) and let the still-free columns F compensate optimally:

    δw_F = −(w_i − q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_{i,F}        loss += (w_i − q_i)² / [H_F⁻¹]_ii / 2

then drop i from F, which for the inverse is one step of Gaussian elimination:
H_F⁻¹ ← H_F⁻¹ − H_F⁻¹[:, i] H_F⁻¹[i, :] / H_F⁻¹[i, i].

Cholesky-of-inverse trick. With a fixed column order, row i of the successively eliminated inverses, scaled by
1/√[H_F⁻¹]_ii, is exactly row i of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU). So one factorisation
U = chol(cholesky_inverse(chol(H)), upper) replaces all the downdates, and the step becomes

    err = (w_i − q_i) / U_ii        W[:, j] −= err · U_ij   (j > i)        loss += err² / 2

The increments are exact, so the total loss is ½ Σ_rows (w − q) H (w − q)ᵀ = ‖X(W − Q)ᵀ‖² / N (damped H).

Lazy blocks. Column j only needs the earlier updates by the time it is quantized. Inside a block of
`block_size` columns the updates are applied one by one; the block's errors Err [out, block] reach all later
columns in one GEMM, W[:, i2:] −= Err · U[i1:i2, i2:], which turns a memory-bound loop into matmuls.

Static groups + act-order. Scales (and zero points) are fixed *before* the loop from the original weight, by
the same RTN/MSE search `WeightQuantizer.init_from` uses, per contiguous group of `group_size` inputs. Act-order
then only changes the order of processing: columns by descending diag(H) (the most-used inputs are rounded
first, while many columns remain to absorb their error); each column is still rounded with the scale of its
original group. The result is therefore an ordinary grouped layout (no g_idx) that FakeQuantLinear,
QuantizedLinear and packing use unchanged, and it lies exactly on the grid of the returned (scale, zero).

Latent weights for QAT. `latent` holds, per column, the value GPTQ rounded: the original weight plus the
compensation folded in from earlier columns. It rounds to exactly the GPTQ codes (same formula, same scale),
so a fake-quant layer whose latent weight it is computes the GPTQ solution bit for bit; unlike the codes, it
keeps how far each weight sits from its rounding boundary, which is what straight-through training moves. A
latent weight started on a grid point must travel half a step before any code changes (LOG.md, issue 9).

Dampening. H += damp · mean(diag H) · I keeps H positive definite when the calibration data does not span
every input direction; being relative, it makes the result independent of H's overall scale. If a Cholesky
still fails, damp is multiplied by 10 and the factorisation retried (up to DAMP_TRIES times).
Dead inputs (diag(H) = 0: never activated) get H_ii = 1 and a zero weight column, which costs nothing on data.

Numerics: everything runs in float32 on the weight's device. TF32 matmuls on CUDA cost accuracy here (the
reference implementation disables them); this module sets nothing global and only warns when they are on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from qat import quant
from qat.config import QuantConfig

log = logging.getLogger(__name__)

DAMP_TRIES = 6  # factorisation attempts, damp ×10 each time (0.01 → 1000): a PSD H is fine long before the end
DAMP_FROM_ZERO = 1e-4  # the first retry's damp when the caller asked for none (×10 of 0 would stay 0)


@dataclass
class GPTQResult:
    weight: Tensor  # [out, in] float32, exactly on the grid of (scale, zero)
    latent: Tensor  # [out, in] float32: the error-compensated values the codes were rounded from (see below)
    scale: Tensor  # [out, n_groups] float32
    zero: Tensor | None  # [out, n_groups] float32 holding integers; None when symmetric
    loss: float  # GPTQ proxy loss Σ (w − q)² / U_ii² / 2 over all weights
    damp: float  # the relative dampening finally used (larger than asked if a Cholesky failed)


def accumulate_hessian(h: Tensor | None, x: Tensor, n_seen: int) -> tuple[Tensor, int]:
    """Fold activations x [..., in] into the running H = (2/N)·Σ x xᵀ over the N tokens seen so far.

    `h` (float32 [in, in], or None to start) is updated in place, so a calibration pass holds one [in, in]
    buffer per layer; returns (h, N). Every token weighs the same, whatever the batch shapes.
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    total = n_seen + x.shape[0]
    if x.shape[0]:
        # (n_seen·H_old + 2·XᵀX) / total in one addmm: no rescaled copy of x, no [in, in] temporary
        h.addmm_(x.T, x, beta=n_seen / total, alpha=2.0 / total)
    return h, total


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    quant_cfg: QuantConfig,
    *,
    scale: Tensor | None = None,
    zero: Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> Tensor:
    """One layer's GPTQ solution as a dequantized float32 weight [out, in] (see `gptq_solve`)."""
    return gptq_solve(
        weight, hessian, quant_cfg, scale=scale, zero=zero, block_size=block_size, damp=damp, act_order=act_order
    ).weight


@torch.no_grad()
def gptq_solve(
    weight: Tensor,
    hessian: Tensor,
    quant_cfg: QuantConfig,
    *,
    scale: Tensor | None = None,
    zero: Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> GPTQResult:
    """GPTQ for weight [out, in] given hessian [in, in] (any PSD matrix, e.g. from `accumulate_hessian`).

    scale/zero: the grid [out, n_groups] to quantize onto; default: RTN (MSE-clipped if `quant_cfg.mse`) from
    the original weight, exactly as `WeightQuantizer.init_from`. A given zero point is rounded, as
    `WeightQuantizer.codes` does. Inputs are not modified.
    """
    bits, sym = quant_cfg.bits, quant_cfg.symmetric
    out_f, in_f = _check_inputs(weight, hessian, quant_cfg, scale, zero, block_size, damp)
    dev = weight.device
    n_groups = quant.group_count(in_f, quant_cfg.group_size)
    if scale is None:
        scale, zero = quant.rtn_qparams(weight.detach(), bits, n_groups, sym, quant_cfg.mse)
    else:
        scale = scale.detach().to(dev, torch.float32).clone()
        zero = None if zero is None else torch.round(zero.detach().to(dev, torch.float32))
    if dev.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        log.warning("GPTQ: float32 matmuls run in reduced precision (TF32); the error updates lose accuracy")

    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(dev, torch.float32).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    # one scale (and zero) per column, from the column's ORIGINAL group: permuting these with W keeps groups static
    group_len = in_f // n_groups
    col_scale = scale.repeat_interleave(group_len, dim=1)
    col_zero = None if zero is None else zero.repeat_interleave(group_len, dim=1)
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # stable: same order on every device
        W, H, col_scale = W[:, perm], H[perm][:, perm], col_scale[:, perm]
        col_zero = None if col_zero is None else col_zero[:, perm]

    U, damp = _inverse_cholesky(H, damp)
    Q, latent = torch.empty_like(W), torch.empty_like(W)
    losses = torch.zeros(out_f, dtype=torch.float32, device=dev)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            c = slice(i1 + i, i1 + i + 1)
            z = None if col_zero is None else col_zero[:, c]
            q = quant.dequantize(quant.quantize(W1[:, i : i + 1], col_scale[:, c], z, bits, sym), col_scale[:, c], z)
            Q[:, c], latent[:, c] = q, W1[:, i : i + 1]
            err = (W1[:, i] - q[:, 0]) / U1[i, i]
            losses += err.square() / 2
            W1[:, i + 1 :] -= torch.outer(err, U1[i, i + 1 :])  # OBS update of the rest of the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy: the whole block's updates to later columns in one GEMM

    if perm is not None:
        inv = torch.argsort(perm)
        Q, latent = Q[:, inv], latent[:, inv]
    return GPTQResult(Q, latent, scale, zero, float(losses.sum()), damp)


def _inverse_cholesky(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (h + damp·mean(diag h)·I)⁻¹, raising damp ×10 until both factorisations work."""
    mean_diag = h.diagonal().mean()
    for attempt in range(DAMP_TRIES):
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and bool(torch.isfinite(U).all()) and bool((U.diagonal() > 0).all()):
                return U, damp
        if attempt == DAMP_TRIES - 1:
            break
        new = damp * 10 if damp > 0 else DAMP_FROM_ZERO
        log.warning("GPTQ: Hessian not positive definite at damp=%g; retrying with damp=%g", damp, new)
        damp = new
    raise torch.linalg.LinAlgError(
        f"GPTQ: the damped Hessian is not positive definite even at damp={damp:g} after {DAMP_TRIES} tries; "
        "use more (or more varied) calibration data or a larger damp"
    )


def _check_inputs(
    weight: Tensor,
    hessian: Tensor,
    cfg: QuantConfig,
    scale: Tensor | None,
    zero: Tensor | None,
    block_size: int,
    damp: float,
) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"GPTQ: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(
            f"GPTQ: hessian must be [{in_f}, {in_f}] to match weight [{out_f}, {in_f}], got {tuple(hessian.shape)}"
        )
    if not cfg.enabled:
        raise ValueError(f"GPTQ: quant_cfg.bits={cfg.bits} means no quantization")
    if block_size < 1 or damp < 0:
        raise ValueError(f"GPTQ: need block_size >= 1 and damp >= 0, got {block_size} and {damp}")
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(hessian).all())):
        raise ValueError("GPTQ: weight or hessian has non-finite entries (NaN/inf activations in calibration?)")
    n_groups = quant.group_count(in_f, cfg.group_size)
    if scale is None:
        if zero is not None:
            raise ValueError("GPTQ: a zero point needs its scale")
        return out_f, in_f
    if scale.shape != (out_f, n_groups):
        raise ValueError(f"GPTQ: scale must be [{out_f}, {n_groups}], got {tuple(scale.shape)}")
    if (zero is None) != cfg.symmetric or (zero is not None and zero.shape != scale.shape):
        want = "no zero point" if cfg.symmetric else f"a zero point [{out_f}, {n_groups}]"
        raise ValueError(f"GPTQ: a {'symmetric' if cfg.symmetric else 'asymmetric'} grid needs {want}")
    return out_f, in_f
