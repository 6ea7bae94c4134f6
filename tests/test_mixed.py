"""Mixed precision: the sensitivity is the exact output error, the allocator meets the budget and follows it."""

from __future__ import annotations

import random

import pytest
import torch

from qat.config import QuantConfig
from qat.ptq import mixed
from qat.ptq.awq import rtn


def hessian(x: torch.Tensor) -> torch.Tensor:
    """GPTQ's H = 2/N Σ x xᵀ."""
    return 2 / x.shape[0] * x.t() @ x


def data(out=24, inp=64, n=200, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g)
    x[:, :4] *= 10  # correlated, anisotropic inputs: the Hessian is far from a multiple of I
    x[:, 4] += x[:, 0]
    return torch.randn(out, inp, generator=g) * 0.02, x


@pytest.mark.parametrize("cfg", [QuantConfig(group_size=32), QuantConfig(group_size=-1, symmetric=False, mse=True)])
def test_sensitivity_is_the_explicit_formula_and_the_output_error(cfg):
    w, x = data()
    h = hessian(x)
    sens = mixed.sensitivity(w, h, cfg, bits=[2, 3, 4, 8, 16])
    for b in (2, 3, 4, 8):
        dw = (w - rtn(w, cfg, bits=b)).double()
        explicit = 0.5 * sum(float(dw[r] @ h.double() @ dw[r]) for r in range(w.shape[0]))
        output_mse = float((x.double() @ dw.t()).pow(2).sum(1).mean())  # (1/N) Σ ‖ΔW x‖²
        assert sens[b] == pytest.approx(explicit, rel=1e-4)
        assert sens[b] == pytest.approx(output_mse, rel=1e-4)
    assert sens[2] > sens[3] > sens[4] > sens[8] > sens[16] == 0.0


def test_sensitivity_rejects_mismatched_shapes():
    w, x = data()
    with pytest.raises(ValueError, match="hessian"):
        mixed.sensitivity(w, hessian(x)[:10, :10], QuantConfig(), [4])


def test_budget_met_exactly_by_the_largest_gains():
    sizes = {f"l{i}": 1000 for i in range(8)}
    gains = [5, 1, 7, 3, 8, 2, 6, 4]
    costs = {f"l{i}": {3: 10.0 + g, 4: 10.0} for i, g in enumerate(gains)}
    bits = mixed.allocate(sizes, costs, 3.5)
    assert sorted(n for n, b in bits.items() if b == 4) == ["l0", "l2", "l4", "l6"]  # gains 5, 7, 8, 6
    s = mixed.summary(sizes, bits, costs)
    assert s.avg_bits == 3.5 and s.layers_per_bits == {3: 4, 4: 4} and s.total_cost == 80 + 1 + 3 + 2 + 4


def test_never_exceeds_the_budget_and_stops_only_when_nothing_fits():
    rng = random.Random(0)
    for trial in range(200):
        names = [f"m{i}" for i in range(rng.randint(1, 9))]
        sizes = {n: rng.choice([7, 13, 100, 257, 1000, 4099]) for n in names}
        choices = rng.choice([[2, 3, 4], [3, 4], [2, 4, 8], [4, 8, 16]])
        costs = {}
        for n in names:
            c, costs[n] = rng.uniform(1, 100), {}
            for b in choices:  # decreasing in the bits
                costs[n][b] = c
                c *= rng.uniform(0.2, 1.0)
        budget = round(rng.uniform(choices[0], choices[-1] + 0.5), 2)
        bits = mixed.allocate(sizes, costs, budget)
        used = sum(sizes[n] * bits[n] for n in names)
        assert used <= budget * sum(sizes.values()) + 1e-9, trial
        if budget >= choices[-1]:
            assert set(bits.values()) == {choices[-1]}
        room = budget * sum(sizes.values()) - used
        for n in names:  # maximal: no further upgrade of any layer fits
            assert all(sizes[n] * (b - bits[n]) > room + 1e-9 for b in choices if b > bits[n]), trial


def test_budget_is_compared_exactly():
    """2.8 · 45 = 126 exactly, but 125.99999999999999 in floats: the 36-bit upgrade of `a` must still fit."""
    sizes = {"a": 36, "b": 9}
    costs = {"a": {2: 10.0, 3: 1.0}, "b": {2: 10.0, 3: 9.0}}
    bits = mixed.allocate(sizes, costs, 2.8)
    assert bits == {"a": 3, "b": 2} and mixed.summary(sizes, bits).total_bits == 126


def test_jumps_are_candidates():
    """2 → 3 gains nothing for `a` but 2 → 4 gains most: a step-by-step greedy would spend the budget on `b`."""
    sizes = {"a": 100, "b": 100}
    costs = {"a": {2: 10.0, 3: 10.0, 4: 0.0}, "b": {2: 5.0, 3: 3.0, 4: 2.0}}
    assert mixed.allocate(sizes, costs, 3.0) == {"a": 4, "b": 2}


def test_deterministic_ties_by_name():
    costs = {n: {3: 2.0, 4: 1.0} for n in ["d", "b", "a", "c"]}
    sizes = {n: 50 for n in ["c", "a", "d", "b"]}
    bits = mixed.allocate(sizes, costs, 3.5)
    assert bits == {"a": 4, "b": 4, "c": 3, "d": 3}
    assert mixed.allocate(dict(reversed(sizes.items())), costs, 3.5) == bits


def test_more_bits_for_more_sensitive_layers():
    """Same weight statistics, Hessians ×50 for three layers: those get the bits."""
    cfg = QuantConfig(group_size=32)
    sizes, costs, hot = {}, {}, {"l1", "l2", "l4"}
    for i in range(6):
        name = f"l{i}"
        w, x = data(seed=i)
        h = hessian(x) * (50.0 if name in hot else 1.0)
        costs[name] = mixed.sensitivity(w, h, cfg, [2, 3, 4])
        sizes[name] = w.numel()
    bits = mixed.allocate(sizes, costs, 3.5)
    assert {n for n, b in bits.items() if b == 4} == hot and {bits[n] for n in sizes.keys() - hot} == {3}
    assert mixed.summary(sizes, bits).avg_bits == 3.5
    low = mixed.allocate(sizes, costs, 2.5)
    assert min(low[n] for n in hot) >= max(low[n] for n in sizes.keys() - hot)


def test_impossible_and_invalid_inputs():
    sizes = {"a": 10, "b": 30}
    costs = {"a": {3: 1.0, 4: 0.5}, "b": {2: 1.0, 4: 0.5}}
    assert mixed.allocate(sizes, costs, 2.25) == {"a": 3, "b": 2}  # the minimum (30 + 60) / 40 is feasible
    with pytest.raises(ValueError, match="below the minimum 2.25"):
        mixed.allocate(sizes, costs, 2.2)
    assert mixed.allocate(sizes, costs, 4) == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="different layers"):
        mixed.allocate({"a": 10}, costs, 4)
    with pytest.raises(ValueError, match="size"):
        mixed.allocate({"a": 0, "b": 30}, costs, 4)
    with pytest.raises(ValueError, match="finite"):
        mixed.allocate(sizes, costs, float("nan"))
