"""Hessian-aware mixed precision (HAWQ-style): a second-order sensitivity per layer and bit width, then bits
per layer under an average-bits budget.

Sensitivity. Quantizing a layer's weight W [out, in] to Ŵ = RTN_b(W) perturbs it by ΔW = W − Ŵ. To second
order the loss grows by ½ vec(ΔW)ᵀ ∇²L vec(ΔW) (the first-order term is ~0 at a trained optimum). HAWQ
(Dong et al.; v1 used the top Hessian eigenvalue, v2 the trace) approximates that quadratic form
isotropically, Ω_b = Tr(∇²L)/n · ‖ΔW‖² (average Hessian trace, from Hutchinson's estimator and backprop,
times the squared perturbation norm).
Here ∇²L is replaced by the Hessian of the layer's own output reconstruction error, the quantity GPTQ
minimises:

    L(Ŵ) = (1/N) Σ_n ‖(W − Ŵ) x_n‖²,      H = ∂²L/∂ŵ_r² = (2/N) Σ_n x_n x_nᵀ   (the same for every row r)

    Δ_b = ½ tr(ΔW H ΔWᵀ) = (1/N) Σ_n ‖ΔW x_n‖²

L is quadratic in Ŵ, so this "second-order estimate" is exact: Δ_b is the mean squared output error the
layer will make at b bits on the calibration inputs (`test_mixed` checks it). It keeps H's off-diagonal
terms, which HAWQ's trace drops, and needs only the input Hessian GPTQ already accumulates, no backprop.
What it does not see: how an output error propagates to the final loss (a layer feeding the LM head and one
in an early block count the same per unit of output MSE), and interactions between layers (errors are
assumed additive). ΔW is the plain RTN error with the recipe's group size, symmetry and MSE clipping; after
GPTQ the error is smaller, and smaller by layer-dependent factors.

Allocation. Minimise Σ_l Δ_l(b_l) subject to Σ_l size_l·b_l ≤ budget·Σ_l size_l (a multiple-choice
knapsack). `allocate` is the greedy by marginal efficiency: start every layer at its lowest bit width and
repeatedly take, among all upgrades b → b' > b of any layer that still fit the budget, the one with the
largest cost reduction per extra bit·parameter, (Δ(b) − Δ(b')) / (size·(b' − b)); jumps (2 → 4) are
candidates, so a layer whose 3-bit cost is no better than its 2-bit cost can still go to 4 bits. It stops
when no upgrade fits (an upgrade that raises the cost, i.e. a noisy estimate, is never taken). Ties go to
the alphabetically first layer, then the smaller jump, so the result is deterministic. The greedy is
optimal for equal layer sizes, consecutive bit choices and costs convex in the bits (it then takes the k
largest marginal gains); in general it is a heuristic that can leave some budget unused or pick a slightly
worse set than the exact knapsack (HAWQ-v3 solves an ILP). The budget counts weight bits only: scales and
zero points (16 or 32 bits per group) are not included; add the group-size dependent overhead to the budget
if needed.

Not covered: the network-loss Hessian (Hutchinson traces, Fisher), activation bits, per-layer group size,
latency or memory models other than parameter bits, and the exact ILP/DP solver.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from qat.config import QuantConfig
from qat.ptq.awq import rtn

FLOAT_BITS = 16  # a layer left in float: no perturbation


@torch.no_grad()
def sensitivity(weight: Tensor, hessian: Tensor, quant_cfg: QuantConfig, bits: Sequence[int]) -> dict[int, float]:
    """{b: ½ tr(ΔW H ΔWᵀ)} with ΔW = W − RTN_b(W) at quant_cfg's group size/symmetry/MSE; 0 for b ≥ 16.

    weight [out, in], hessian [in, in] (GPTQ's H = 2/N Σ x xᵀ gives the mean squared output error per token).
    The product runs in float32 on the Hessian's device and is summed in float64.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight [out, in] needs hessian [in, in]; got {tuple(weight.shape)}, {tuple(hessian.shape)}")
    w = weight.detach().to(device=hessian.device, dtype=torch.float32)
    h = hessian.detach().float()
    out: dict[int, float] = {}
    for b in bits:
        if b >= FLOAT_BITS:
            out[b] = 0.0
            continue
        if b < 2:
            raise ValueError(f"bits must be >= 2, got {b}")
        dw = w - rtn(w, quant_cfg, bits=b)
        out[b] = 0.5 * float(((dw @ h) * dw).sum(dtype=torch.float64))
    return out


def _exact(budget: float | Fraction) -> Fraction:
    """The budget as an exact rational: str() keeps what was typed (3.3 → 33/10, not the nearest binary float)."""
    if isinstance(budget, float) and not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    return Fraction(str(budget))


def _validate(sizes: Mapping[str, int], costs: Mapping[str, Mapping[int, float]]) -> None:
    if set(sizes) != set(costs):
        only_s, only_c = sorted(set(sizes) - set(costs)), sorted(set(costs) - set(sizes))
        raise ValueError(f"sizes and costs name different layers: only in sizes {only_s}, only in costs {only_c}")
    if not sizes:
        raise ValueError("no layers to allocate")
    for n in sizes:
        if sizes[n] <= 0:
            raise ValueError(f"layer {n}: size must be > 0, got {sizes[n]}")
        if not costs[n]:
            raise ValueError(f"layer {n}: no bit widths to choose from")
        if any(math.isnan(c) for c in costs[n].values()):
            raise ValueError(f"layer {n}: NaN cost in {dict(costs[n])}")


def allocate(sizes: Mapping[str, int], costs: Mapping[str, Mapping[int, float]], budget: float) -> dict[str, int]:
    """Bits per layer minimising Σ costs[name][bits] with Σ sizes·bits ≤ budget·Σ sizes (greedy, see docstring).

    sizes: parameters per layer; costs: {name: {bits: cost}} (the bit widths a layer may take are its keys);
    budget: average bits per parameter. Everything gets its highest width when that fits; a budget below the
    all-lowest average raises ValueError. The budget is compared exactly (integers and rationals).
    """
    _validate(sizes, costs)
    names = sorted(sizes)  # fixed scan order: the tie-breaks below rely on it
    options = {n: sorted(costs[n]) for n in names}
    total = sum(sizes[n] for n in names)
    cap = _exact(budget) * total
    used = sum(sizes[n] * options[n][0] for n in names)
    if used > cap:
        raise ValueError(
            f"budget {budget} bits/param is below the minimum {used / total:.6g} (every layer at its lowest bits)"
        )
    if sum(sizes[n] * options[n][-1] for n in names) <= cap:
        return {n: options[n][-1] for n in names}
    bits = {n: options[n][0] for n in names}
    while True:
        best: tuple[tuple[float, str, int], int] | None = None
        for n in names:
            b0, c0 = bits[n], costs[n][bits[n]]
            for b in options[n]:
                if b <= b0:
                    continue
                extra = sizes[n] * (b - b0)
                if used + extra > cap:
                    break  # wider jumps of this layer cost even more bits
                gain = c0 - costs[n][b]
                if gain < 0:  # more bits, higher cost (a noisy estimate): never worth budget
                    continue
                key = (-gain / extra, n, b)  # largest efficiency, then first name, then the smaller jump
                if best is None or key < best[0]:
                    best = (key, extra)
        if best is None:
            return bits
        (_, n, b), extra = best
        bits[n] = b
        used += extra


@dataclass
class Allocation:
    """What an allocation achieves: average bits per parameter, total cost, and how the bits are spread."""

    avg_bits: float
    total_bits: int
    total_cost: float | None
    layers_per_bits: dict[int, int]
    params_per_bits: dict[int, int]


def summary(
    sizes: Mapping[str, int], bits: Mapping[str, int], costs: Mapping[str, Mapping[int, float]] | None = None
) -> Allocation:
    """Average bits (Σ size·bits / Σ size), total cost when costs are given, and the per-width histograms."""
    total_bits = sum(sizes[n] * bits[n] for n in bits)
    layers: dict[int, int] = {}
    params: dict[int, int] = {}
    for n in sorted(bits):
        layers[bits[n]] = layers.get(bits[n], 0) + 1
        params[bits[n]] = params.get(bits[n], 0) + sizes[n]
    return Allocation(
        avg_bits=total_bits / sum(sizes[n] for n in bits),
        total_bits=total_bits,
        total_cost=None if costs is None else float(sum(costs[n][bits[n]] for n in bits)),
        layers_per_bits=dict(sorted(layers.items())),
        params_per_bits=dict(sorted(params.items())),
    )
