"""Fast diffusion decoding: the lean forward against transformers' (bitwise where it claims so), the lean sampler
against the reference tokens, windows over cached keys and values against the full forward, the block-cache
sampler where its cache is exact (one layer), parallel commits, quantized models in the sampler."""

from __future__ import annotations

import pytest
import torch

from qat.config import QuantConfig
from qat.models.lean import LeanDecoder
from qat.models.sampler import diffusion_generate
from qat.swap import convert, prepare
from tests.test_sampler import DETERMINISTIC, MASK, bidirectional, counting, prompt


@pytest.fixture(scope="module")
def model():
    return bidirectional(3)


def rope(lean: LeanDecoder, n: int, positions: torch.Tensor | None = None):
    return lean.rope(torch.arange(n)[None] if positions is None else positions, torch.float32)


def test_forward_is_transformers_forward_bitwise(model):
    """Every call (the first plain, then through the packed weights) equals transformers' decoder output."""
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    lean = LeanDecoder(model)
    with torch.no_grad():
        want = model.model(input_ids=x).last_hidden_state
        for _ in range(3):
            assert torch.equal(lean.forward(x, rope(lean, 30))[0], want)
    assert lean._packs or not lean.pack  # the packed path did run


def test_sibling_linears_are_one_packed_matmul_bitwise(model):
    """q/k/v-like siblings (with and without bias) through one concatenated packed matmul equal separate calls;
    a fake-quant sibling keeps every call separate."""
    torch.manual_seed(0)
    lean, x = LeanDecoder(model), torch.randn(2, 30, 16)
    mods = (torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(16, 8), torch.nn.Linear(16, 8, bias=False))
    want = [m(x) for m in mods]
    with torch.no_grad():
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(lean.linears(mods, x), want, strict=True))
    assert lean._packs or not lean.pack
    fq = prepare(torch.nn.Sequential(torch.nn.Linear(16, 8)), QuantConfig(bits=4, group_size=16))[0]
    lean = LeanDecoder(model)
    for _ in range(3):
        lean.linears((mods[0], fq), x)
    assert not lean._packs


def test_rows_and_head_are_the_logits_of_those_rows(model):
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    lean, rows = LeanDecoder(model), torch.tensor([0, 7, 8, 29])
    with torch.no_grad():
        want = model(input_ids=x).logits[:, rows]
        hidden, _ = lean.forward(x, rope(lean, 30), rows=rows)
        torch.testing.assert_close(lean.head_logits(hidden), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("alg", DETERMINISTIC)
@pytest.mark.parametrize("steps", [10, 20])
def test_lean_sampler_gives_the_reference_tokens(model, alg, steps):
    ids = prompt(2, 6, seed=2)
    kw = dict(max_new_tokens=10, steps=steps, alg=alg)
    assert torch.equal(diffusion_generate(model, ids, lean=True, fast=True, **kw), diffusion_generate(model, ids, **kw))


def test_lean_sampler_with_padding_and_sampling(model):
    """Left padding hidden by attention_mask, temperature sampling: lean equals the plain sampler."""
    ids = prompt(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", temperature=0.8, attention_mask=mask)
    a = diffusion_generate(model, ids, generator=torch.Generator().manual_seed(4), **kw)
    b = diffusion_generate(model, ids, generator=torch.Generator().manual_seed(4), lean=True, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("padded", [False, True])
def test_window_over_fresh_context_equals_the_full_forward(model, padded):
    """A window attending to the other positions' K/V (computed from the same x) is the full forward's window:
    the machinery cached decoding relies on, without the staleness."""
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    if padded:
        key_mask[1, :4] = False
    lean = LeanDecoder(model, pack=False)
    cos, sin = rope(lean, 24)
    with torch.no_grad():
        full, kv = lean.forward(x, (cos, sin), key_mask=key_mask if padded else None, keep_kv=True)
        w0, w1 = 9, 17
        outside = torch.cat([torch.arange(0, w0), torch.arange(w1, 24)])
        window, _ = lean.forward(x[:, w0:w1], (cos[:, w0:w1], sin[:, w0:w1]), context=kv.select(outside),
                                 context_mask=key_mask[:, outside] if padded else None,
                                 key_mask=key_mask[:, w0:w1] if padded else None)  # fmt: skip
    torch.testing.assert_close(window, full[:, w0:w1], rtol=0, atol=1e-5)


def one_layer() -> torch.nn.Module:
    """One layer: its keys and values depend on each position's own token only, so the block cache is exact."""
    return bidirectional(6, num_hidden_layers=1, max_window_layers=1)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("alg", DETERMINISTIC)
def test_block_cache_is_exact_where_keys_do_not_change(cache, alg):
    """With one layer the cached keys and values are not stale, so the cached sampler gives the uncached block
    sampler's tokens; with more layers it may not (it is an approximation)."""
    m, ids = one_layer(), prompt(2, 5, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(max_new_tokens=12, steps=12, alg=alg, block_length=4, attention_mask=mask)
    want = diffusion_generate(m, ids, lean=True, **kw)
    calls = counting(m)
    assert torch.equal(diffusion_generate(m, ids, cache=cache, **kw), want)
    assert calls[0] == 0  # the cache path never runs transformers' forward: every step went through the cache


def test_block_cache_runs_full_forwards_only_at_block_starts(model):
    from qat.models import block_cache

    seen = []
    real = block_cache.BlockCachePredictor.__call__

    def spy(self, x, active):
        out = real(self, x, active)
        seen.append(dict(self.forwards))
        return out

    block_cache.BlockCachePredictor.__call__ = spy
    try:
        out = diffusion_generate(model, prompt(1, 6), max_new_tokens=12, steps=12, alg="entropy", block_length=4,
                                 cache="dual")  # fmt: skip
    finally:
        block_cache.BlockCachePredictor.__call__ = real
    assert seen[-1] == {"full": 3, "window": 9} and not (out == MASK).any()


def test_threshold_commits_in_parallel(model):
    """A threshold every prediction passes fills each block in one forward; the tokens are then that forward's
    choices, i.e. the first step of block decoding for the first block."""
    ids, calls = prompt(1, 6, seed=8), counting(model)
    kw = dict(max_new_tokens=12, steps=12, alg="maskgit_plus", block_length=4)
    fast = diffusion_generate(model, ids, threshold=1e-9, **kw)
    assert calls[0] == 3 and not (fast == MASK).any()
    one = diffusion_generate(model, ids, max_new_tokens=12, steps=1, alg="maskgit_plus")  # all 12 at once
    assert torch.equal(fast[:, 6:10], one[:, 6:10])  # the first block: the same single forward's argmaxes
    calls[0] = 0
    cached = diffusion_generate(model, ids, threshold=0.999, cache="dual", **kw)  # nothing that sure: 1 per step
    assert not (cached == MASK).any()


def test_quantized_models_run_in_every_mode(model, monkeypatch):
    """Fake-quant and integer (converted) CoDA: the lean sampler gives the plain sampler's tokens, the cached one
    fills every position."""
    import copy

    monkeypatch.setenv("QAT_KERNELS", "dense")
    fq = copy.deepcopy(model)
    prepare(fq, QuantConfig(bits=4, group_size=32))
    ids = prompt(2, 6, seed=9)
    kw = dict(max_new_tokens=8, steps=8, alg="entropy")
    for m in (fq, convert(copy.deepcopy(fq))):
        assert torch.equal(diffusion_generate(m, ids, lean=True, **kw), diffusion_generate(m, ids, **kw))
        out = diffusion_generate(m, ids, cache="dual", block_length=4, threshold=0.9, **kw)
        assert not (out[:, 6:] == MASK).any()


@pytest.mark.parametrize("kw", [dict(cache="dual"), dict(cache="lru", block_length=4),
                                dict(threshold=0.9, alg="origin"), dict(threshold=0.0)])  # fmt: skip
def test_invalid_cache_arguments(model, kw):
    with pytest.raises(ValueError):
        diffusion_generate(model, prompt(), max_new_tokens=8, **{"alg": "entropy", **kw})


@pytest.mark.parametrize("alg", DETERMINISTIC)
@pytest.mark.parametrize("steps,draft", [(10, 2), (10, 4), (5, 3), (20, 4)])
def test_draft_and_verify_gives_the_reference_tokens(model, alg, steps, draft):
    ids = prompt(2, 6, seed=10)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(max_new_tokens=10, steps=steps, alg=alg, attention_mask=mask)
    assert torch.equal(diffusion_generate(model, ids, draft=draft, **kw), diffusion_generate(model, ids, **kw))


def test_draft_and_verify_advances_several_steps_per_forward_when_drafts_are_right():
    """A model whose predictions do not depend on x: every draft is right, so each forward verifies `draft`
    steps (1 forward for the start, then one per round)."""
    from qat.models import speculative
    from tests.test_sampler import Table, table_of

    table = table_of(*[[0.1 * (i + 1), 0.2] for i in range(8)])  # 8 answer positions, distinct confidences
    x = torch.nn.functional.pad(torch.zeros(1, 1, dtype=torch.long), (0, 8), value=table.shape[-1] - 1)
    kw = dict(steps=8, mask_id=table.shape[-1] - 1, alg="maskgit_plus", top_p=None, top_k=None, eps=1e-3)
    out, forwards = speculative.generate(Table(table), x.clone(), draft=4, **kw)
    ref = diffusion_generate(Table(table), x[:, :1], max_new_tokens=8, steps=8, alg="maskgit_plus")
    assert torch.equal(out, ref) and forwards == 1 + 2  # steps 0-3 and 4-7 verified in one forward each
    assert speculative.generate(Table(table), x.clone(), draft=1, **kw)[1] == 8  # no drafting: one per step


def test_draft_refuses_what_it_cannot_do_losslessly(model):
    for kw in (dict(temperature=0.5), dict(alg="origin"), dict(block_length=4), dict(draft=1)):
        with pytest.raises(ValueError):
            diffusion_generate(model, prompt(), max_new_tokens=8, **{"alg": "entropy", "draft": 3, **kw})
