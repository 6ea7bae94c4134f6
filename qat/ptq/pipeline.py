"""PTQ from a recipe: RTN, GPTQ, AWQ and mixed precision, ending in a *prepared* model that QAT continues.

    quantize_model(model, tokenizer, recipe) -> PTQResult

`quant.init=rtn` with integer bits is `qat.swap.prepare` (no data). Anything else streams calibration windows
(qat/ptq/calibrate.py) through the decoder one layer at a time and, per layer:

    gptq   true-sequential: [q, k, v] → [o] → [gate, up] → [down]; for each group, the layer runs over the
           calibration batches with the earlier groups already quantized, hooks accumulate each linear's input
           Hessian H = 2/N Σ x xᵀ, and `gptq_solve` finds the weights on the grid of static (RTN-initialised)
           groups (qat/ptq/gptq.py)
    awq    the float inputs of every linear are captured, activation-aware scales are searched and folded into
           the preceding norm or linear (qat/ptq/awq.py), then RTN on the scaled weights
    rtn    round to nearest (mixed precision with rtn: the bits come from the calibration Hessians)

then the layer's outputs, computed with its quantized linears, become the next layer's inputs (sequential
PTQ: each layer is calibrated on what it will really see). Mixed precision (`quant.bits=3.5`) first runs one
float pass to measure every linear's Hessian sensitivity at each of `quant.mixed_choices` bits, allocates bits
to meet the average (qat/ptq/mixed.py), then quantizes as above with those per-module bits. Linears outside the
decoder layers (an unskipped lm_head) get RTN at the largest choice within the budget, counted in the average.

The solution is kept as quantizer state: each linear becomes a FakeQuantLinear whose scales and zero points
are the PTQ solution's and whose weight rounds to the solution (GPTQ: the error-compensated values its codes were
rounded from, qat/ptq/gptq.py *Latent weights*), so the prepared model computes the PTQ model bit for bit and QAT
starts exactly where PTQ ended. (Re-deriving scales from GPTQ-updated weights would re-round them and lose the
GPTQ gain.)

Reported per decoder layer: the relative error of the layer's contribution (output − input) on the calibration
inputs, ‖f_q(h) − f(h)‖² / ‖f(h) − h‖², for the method and for plain RTN of the same float layer on the same
inputs. Linears outside the decoder layers that are not skipped (lm_head when un-skipped) get RTN.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat import quant
from qat.config import QuantConfig, Recipe
from qat.modules import FakeQuantLinear
from qat.ptq import awq, gptq, mixed
from qat.ptq.calibrate import LayerInputs, calibration_ids, capture, decoder_layers
from qat.swap import check_group_size, module_config, prepare, replace_module, skipped

log = logging.getLogger(__name__)

SEQUENTIAL = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
AWQ_TOKENS = 8192  # calibration tokens kept per linear for AWQ's searches (evenly spaced)


@dataclass
class LayerReport:
    layer: int
    error: float  # relative error of the layer's contribution, this method
    rtn_error: float  # the same for plain RTN of the float layer on the same inputs
    bits: dict[str, int] = field(default_factory=dict)  # per linear (relative name)


@dataclass
class PTQResult:
    method: str
    bits: dict[str, int] | None  # per module (full name) when mixed precision allocated them
    layers: list[LayerReport]
    seconds: float
    calib_tokens: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # parameters per module (mixed precision)

    def summary(self) -> str:
        if not self.layers:
            return f"ptq: {self.method} (no calibration)"
        lines = [f"ptq: {self.method}, {self.calib_tokens} calibration tokens, {self.seconds:.1f} s",
                 "layer  error    rtn_error  ratio  bits"]  # fmt: skip
        for r in self.layers:
            bits = " ".join(f"{n.split('.')[-1]}={b}" for n, b in r.bits.items())
            ratio = r.error / r.rtn_error if r.rtn_error > 0 else math.nan
            lines.append(f"{r.layer:5d}  {r.error:.3e}  {r.rtn_error:.3e}  {ratio:5.2f}  {bits}")
        if self.bits:
            sizes = self.sizes
            avg = sum(sizes[n] * b for n, b in self.bits.items()) / sum(sizes[n] for n in self.bits)
            lines.append(f"mixed precision: average {avg:.3f} bits over {len(self.bits)} linears")
        return "\n".join(lines)


def _targets(layer: nn.Module, prefix: str, cfg: QuantConfig) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if type(m) is nn.Linear and not skipped(prefix + n, list(cfg.skip))}


def _groups(names: list[str]) -> list[list[str]]:
    """True-sequential groups present in this layer, then any other linears one by one."""
    groups = [[n for n in g if n in names] for g in SEQUENTIAL]
    known = {n for g in SEQUENTIAL for n in g}
    return [g for g in groups if g] + [[n] for n in names if n not in known]


def _swap_rtn(layer: nn.Module, linears: dict[str, nn.Linear], cfgs: dict[str, QuantConfig]) -> None:
    for n, m in linears.items():
        replace_module(layer, n, FakeQuantLinear.from_linear(m, cfgs[n]))


def _hessians(layer: nn.Module, names: list[str], inputs: LayerInputs) -> dict[str, Tensor]:
    acc: dict[str, tuple[Tensor | None, int]] = dict.fromkeys(names, (None, 0))

    def add(name: str, x: Tensor) -> None:
        h, n = acc[name]
        acc[name] = gptq.accumulate_hessian(h, x, n)

    capture(layer, names, inputs, add)
    return {n: h for n, (h, _) in acc.items()}


def _gptq(layer: nn.Module, linears: dict[str, nn.Linear], cfgs: dict[str, QuantConfig], inputs: LayerInputs,
          q: QuantConfig) -> None:  # fmt: skip
    for group in _groups(list(linears)):
        hessians = _hessians(layer, group, inputs)  # earlier groups already quantized: true-sequential
        for n in group:
            m = linears[n]
            res = gptq.gptq_solve(m.weight.detach(), hessians[n], cfgs[n], block_size=q.gptq_block,
                                  damp=q.gptq_damp, act_order=q.act_order)  # fmt: skip
            with torch.no_grad():
                m.weight.copy_(_latent(res, cfgs[n], m.weight.dtype))
                fq = FakeQuantLinear.from_linear(m, cfgs[n])
                fq.weight_quantizer.scale.copy_(res.scale)  # the solution's own grid, not re-derived from Q
                if res.zero is not None:
                    fq.weight_quantizer.zero_point.copy_(res.zero)
            replace_module(layer, n, fq)


def _latent(res: gptq.GPTQResult, cfg: QuantConfig, dtype: torch.dtype) -> Tensor:
    """The latent weight QAT continues from: GPTQ's pre-rounding values (gptq.py, *Latent weights*), pulled into
    the grid's range (a value beyond it would get no clipped-STE gradient), in `dtype`; wherever the cast would
    change a code, the grid point itself. Rounds to exactly GPTQ's codes, so the layer computes GPTQ's solution."""
    lo, hi = quant.int_range(cfg.bits, cfg.symmetric)
    n_groups = res.scale.shape[1]
    z = 0.0 if res.zero is None else res.zero.unsqueeze(-1)
    s = res.scale.unsqueeze(-1)
    lat = quant.grouped(res.latent, n_groups)
    lat = torch.maximum(torch.minimum(lat, (hi - z) * s), (lo - z) * s).view_as(res.latent).to(dtype)
    on_grid = res.weight.to(dtype)
    same = quant.quantize(lat.float(), res.scale, res.zero, cfg.bits, cfg.symmetric) == quant.quantize(
        on_grid.float(), res.scale, res.zero, cfg.bits, cfg.symmetric)
    return torch.where(same, lat, on_grid)


def _awq(layer: nn.Module, linears: dict[str, nn.Linear], cfgs: dict[str, QuantConfig], inputs: LayerInputs,
         q: QuantConfig) -> None:  # fmt: skip
    # every linear of the layer, skipped ones too: a fold must scale the whole group to keep the function
    xs: dict[str, list[Tensor]] = {n: [] for n, m in layer.named_modules() if type(m) is nn.Linear}
    capture(layer, list(xs), inputs, lambda n, x: xs[n].append(x.float()))
    cat = {}
    for n, parts in xs.items():
        x = torch.cat(parts)
        cat[n] = x[torch.linspace(0, len(x) - 1, min(len(x), AWQ_TOKENS)).long()] if len(x) > AWQ_TOKENS else x
    # one grid per layer for the search (with mixed precision: the layer's most common bit width)
    bits = [c.bits for c in cfgs.values()]
    awq.awq_layer(layer, cat, cfgs[max(cfgs, key=lambda n: bits.count(cfgs[n].bits))], clip=q.awq_clip)
    _swap_rtn(layer, linears, cfgs)


def _rtn_outputs(layer: nn.Module, linears: dict[str, nn.Linear], cfgs: dict[str, QuantConfig],
                 inputs: LayerInputs) -> list[Tensor]:  # fmt: skip
    """The layer's outputs with its targets rounded to nearest: weights swapped in place and restored (no copy
    of the layer, whose parameters may be ZeRO-3 partitions gathered for the duration)."""
    saved = {n: m.weight.data for n, m in linears.items()}
    try:
        for n, m in linears.items():
            m.weight.data = awq.rtn(saved[n].float(), cfgs[n]).to(saved[n].dtype)
        return list(inputs.run(layer))
    finally:
        for n, m in linears.items():
            m.weight.data = saved[n]


def _contribution_error(outputs: list[Tensor], reference: list[Tensor], inputs: list[Tensor]) -> float:
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outputs, reference, strict=True))
    den = sum(float((r.float() - h.float()).pow(2).sum()) for r, h in zip(reference, inputs, strict=True))
    return num / max(den, 1e-30)


def allocate_bits(model: nn.Module, ids: Tensor, q: QuantConfig, names: dict[int, str]) -> tuple[dict, dict]:
    """Per-module bits meeting the average q.bits, from Hessian sensitivities on the float model; (bits, sizes)."""
    inputs = LayerInputs(model, ids, q.calib_batch)
    costs, sizes = {}, {}
    for layer in tqdm(decoder_layers(model), desc="sensitivity", leave=False):
        prefix = names[id(layer)] + "."
        linears = _targets(layer, prefix, q)
        hessians = _hessians(layer, list(linears), inputs)
        for n, m in linears.items():
            costs[prefix + n] = mixed.sensitivity(m.weight.detach(), hessians[n], q, q.mixed_choices)
            sizes[prefix + n] = m.weight.numel()
        inputs.advance(layer)  # float model: sensitivities of the unquantized network
    # linears outside the decoder layers (an unskipped lm_head): no Hessian is measured for them; they take the
    # largest choice within the budget and count against it like every other weight
    floor = max(c for c in q.mixed_choices if c <= q.bits)
    for n, m in model.named_modules():
        if type(m) is nn.Linear and n not in sizes and not skipped(n, list(q.skip)):
            costs[n], sizes[n] = {floor: 0.0}, m.weight.numel()
    return mixed.allocate(sizes, costs, q.bits), sizes


def quantize_model(
    model: nn.Module, tokenizer, recipe: Recipe, progress: bool = True, report: bool = False
) -> PTQResult:
    """Prepare `model` for QAT from the recipe's PTQ initialisation (module docstring); in place. `report`: run
    the calibrated layer loop even for uniform RTN (same result, plus its per-layer errors)."""
    q = recipe.quant
    if not q.enabled or not (q.calibrated or report):
        prepare(model, q)
        return PTQResult(q.init if q.enabled else "float", None, [], 0.0)
    check_group_size(model, q)
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    ids = calibration_ids(recipe, tokenizer, model.config).to(device)
    names = {id(m): n for n, m in model.named_modules()}
    bits, sizes = allocate_bits(model, ids, q, names) if q.mixed else (None, {})
    inputs = LayerInputs(model, ids, q.calib_batch)
    reports = []
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=f"ptq {q.init}", disable=not progress)):
        prefix = names[id(layer)] + "."
        linears = _targets(layer, prefix, q)
        cfgs = {n: module_config(q, prefix + n, bits) for n in linears}
        reference = list(inputs.run(layer))
        rtn_error = _contribution_error(_rtn_outputs(layer, linears, cfgs, inputs), reference, inputs.hidden)
        if q.init == "gptq":
            _gptq(layer, linears, cfgs, inputs, q)
        elif q.init == "awq":
            _awq(layer, linears, cfgs, inputs, q)
        else:
            _swap_rtn(layer, linears, cfgs)
        outputs = list(inputs.run(layer))
        reports.append(LayerReport(i, _contribution_error(outputs, reference, inputs.hidden), rtn_error,
                                   {n: c.bits for n, c in cfgs.items()}))  # fmt: skip
        inputs.hidden = outputs  # sequential: the next layer sees this quantized layer's outputs
    prepare(model, q, bits)  # whatever is left (no-op when every target was inside a decoder layer)
    result = PTQResult(q.init, bits, reports, time.perf_counter() - t0, int(ids.numel()), sizes)
    log.info(result.summary())
    return result
