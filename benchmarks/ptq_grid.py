"""Which grid per width? PTQ validation loss of a recipe's model over group sizes × symmetric/asymmetric × methods.

    python benchmarks/ptq_grid.py recipe=tiny_qwen3_int4 [bits=[8,4,3,2]] [groups=[32,64,128,-1]]
                                  [methods=[rtn,gptq]] [rows=128]

For each (bits, group size, symmetric, method) the recipe's base model is quantized by the PTQ pipeline the
trainer uses (`qat.ptq.pipeline.quantize_model`, calibration from the recipe) and scored with the trainer's
validation metric (eval.heldout's definition) on `rows` windows spread over the validation split. Printed: the
loss, its increase over the float model, and the bits per weight the format costs (codes + one fp16 scale, and
a zero point when asymmetric, per group), so a width's grid can be chosen on accuracy per stored bit. This is
an accuracy measurement (deterministic), not a timing one; the choice it informed is in LOG.md.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat import data  # noqa: E402
from qat.config import load_recipe, parse_cli  # noqa: E402
from qat.models import load  # noqa: E402
from qat.objectives import HELDOUT_RATIOS, heldout_loss  # noqa: E402
from qat.ptq.pipeline import quantize_model  # noqa: E402


@dataclass
class GridConfig:
    recipe: str = "tiny_qwen3_int4"
    bits: list[int] = field(default_factory=lambda: [8, 4, 3, 2])
    groups: list[int] = field(default_factory=lambda: [32, 64, 128, -1])
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq"])
    rows: int = 128


def bits_per_weight(model) -> float:
    """Stored bits per quantized weight: the codes plus an fp16 scale (and a `bits`-bit zero point) per group."""
    from qat.modules import FakeQuantLinear

    total = weights = 0
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            q = m.weight_quantizer
            total += m.weight.numel() * q.bits + q.scale.numel() * (16 + (0 if q.symmetric else q.bits))
            weights += m.weight.numel()
    return total / weights


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(GridConfig, sys.argv[1:] if argv is None else argv)
    recipe = load_recipe([f"recipe={cfg.recipe}"])
    base, tok = load(recipe.model.path)
    family = recipe.model.family
    ids = data.windows(data.eval_source(recipe.data), tok, recipe.train.seq_len, cfg.rows)

    def score(model) -> float:
        return heldout_loss(model, ids, family, list(HELDOUT_RATIOS), batch_size=16)["loss"]

    ref = score(base)
    print(f"{recipe.model.path} ({family}), validation: {data.describe(data.eval_source(recipe.data))}, "
          f"{len(ids)} windows; float {ref:.4f}")  # fmt: skip
    print("| bits | group | sym | method | loss | Δ float | bits/weight |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for b in cfg.bits:
        for g in cfg.groups:
            for sym in (True, False):
                for m in cfg.methods:
                    q = replace(recipe.quant, bits=b, group_size=g, symmetric=sym, init=m, scales="static")
                    model = copy.deepcopy(base)
                    quantize_model(model, tok, replace(recipe, quant=q), progress=False)
                    loss = score(model)
                    bpw = bits_per_weight(model)
                    print(f"| {b} | {g} | {'yes' if sym else 'no'} | {m} | {loss:.4f} | {loss - ref:+.4f} | "
                          f"{bpw:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
