"""prepare / convert / set_fake_quant: module swaps selected by fully-qualified-name patterns.

    prepare(model, cfg)      every nn.Linear whose name matches no `cfg.skip` pattern → FakeQuantLinear
                             (same Parameters, quantizer RTN-initialised from them). At this point the model
                             computes exactly the RTN post-training-quantized model.
    convert(model)           every FakeQuantLinear → QuantizedLinear (packed codes + scales); the converted
                             model computes exactly what the prepared model computed.
    set_fake_quant(m, on)    toggle fake quant (delayed fake quant, the KD teacher, float evaluation).

A skip pattern is an fnmatch pattern matched against the module's full name or any dot-suffix of it, so
`lm_head` also skips `base_model.model.lm_head` under PEFT. Models are modified in place and returned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from qat import quant
from qat.config import QuantConfig, RecipeError
from qat.modules import FakeQuantLinear, QuantizedLinear

log = logging.getLogger(__name__)


def skipped(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch(s, p) for p in patterns for s in suffixes)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, FakeQuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear))


def module_config(cfg: QuantConfig, name: str, bits: dict[str, int] | None = None) -> QuantConfig:
    """The settings of one module: `cfg` with that module's bits when a per-module allocation is given."""
    if bits is not None and name in bits:
        return replace(cfg, bits=bits[name])
    if cfg.mixed:
        raise ValueError(f"quant.bits={cfg.bits} (mixed precision) needs a per-module allocation; none for {name}")
    return cfg


def check_group_size(model: nn.Module, cfg: QuantConfig) -> None:
    """A RecipeError naming the first selected linear whose input width `quant.group_size` does not divide."""
    if not cfg.enabled or cfg.group_size == -1:
        return
    for name, m in model.named_modules():
        if type(m) is nn.Linear and not skipped(name, list(cfg.skip)) and m.in_features % cfg.group_size:
            raise RecipeError(f"quant.group_size={cfg.group_size} does not divide the input width {m.in_features} "
                              f"of {name}; use a divisor of it, or -1 (one group per output channel)")  # fmt: skip


def prepare(model: nn.Module, cfg: QuantConfig, bits: dict[str, int] | None = None) -> nn.Module:
    """Swap the selected linears for FakeQuantLinear (no-op when cfg.bits == 16). `bits` overrides the bit
    width per module name (mixed precision, see qat/ptq/mixed.py)."""
    if not cfg.enabled:
        return model
    check_group_size(model, cfg)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if not skipped(n, list(cfg.skip))]
    for name, mod in chosen:
        replace_module(model, name, FakeQuantLinear.from_linear(mod, module_config(cfg, name, bits)))
    log.info(
        "prepare: swapped %d/%d linears to %s-bit fake quant (group %d)",
        len(chosen),
        len(linears),
        cfg.bits,
        cfg.group_size,
    )
    return model


def convert(model: nn.Module) -> nn.Module:
    """Bake every FakeQuantLinear into a QuantizedLinear."""
    for name, mod in list(fake_quant_modules(model)):
        replace_module(model, name, QuantizedLinear.from_fake_quant(mod))
    return model


def set_fake_quant(model: nn.Module, on: bool) -> int:
    """Enable or disable fake quant on every FakeQuantLinear; returns how many were set."""
    mods = [m for _, m in fake_quant_modules(model)]
    for m in mods:
        m.enabled = on
    return len(mods)


def rederive_scales(model: nn.Module) -> int:
    """Re-initialise every static or learned quantizer grid from its current weight (RTN, MSE-clipped when
    configured); returns how many. Used when delayed fake quant switches on: the grid fitted to the weights
    before the float steps no longer fits the weights after them (dynamic grids follow the weight anyway)."""
    n = 0
    for _, m in fake_quant_modules(model):
        if m.weight_quantizer.mode != "dynamic":
            m.weight_quantizer.init_from(m.weight)
            n += 1
    return n


@torch.no_grad()
def quant_stats(
    model: nn.Module, previous: dict[str, Tensor] | None = None
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Quantization statistics over all FakeQuantLinear weights.

    Returns ({"quant/rel_error": Σ|w − ŵ| / Σ|w|, "quant/flip_fraction": share of weights whose integer
    code changed since `previous` (absent without it)}, codes to pass as `previous` next time (int8, CPU)).
    """
    err = total = flips = count = 0.0
    codes: dict[str, Tensor] = {}
    for name, m in fake_quant_modules(model):
        q, s, z = m.weight_quantizer.codes(m.weight)
        e, t = quant.quant_error(m.weight, quant.dequantize(q, s, z))
        err, total = err + e, total + t
        codes[name] = q.to(
            torch.int8 if m.weight_quantizer.bits < 8 or m.weight_quantizer.symmetric else torch.int16
        ).cpu()
        if previous is not None and name in previous:
            flips += (codes[name] != previous[name]).sum().item()
            count += q.numel()
    stats = {"quant/rel_error": err / max(total, 1e-30)}
    if count:
        stats["quant/flip_fraction"] = flips / count
    return stats, codes
