"""The diffusion sampler: commit schedule, each algorithm's confidence, top-p/top-k, batching, the exactness of
fast=True, sampling reproducibility, hooks, argument checks and the (non-reference) block mode."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qat.models.coda import CoDAConfig, CoDAForMaskedDiffusion
from qat.models.sampler import ALGS, _Predictor, diffusion_generate, sample_tokens, top_k_filter, top_p_filter
from qat.models.tiny import TINY_SIZES

MASK = 259
DETERMINISTIC = ["maskgit_plus", "topk_margin", "entropy"]


def bidirectional(seed: int = 0, **sizes) -> nn.Module:
    """A tiny random CoDA (qat.models.coda) with mask id 259 whose head row is zero, so that a random head never
    prefers committing the mask id (a trained CoDA never does either). `sizes` override TINY_SIZES."""
    torch.manual_seed(seed)
    config = CoDAConfig(vocab_size=260, **{**TINY_SIZES, **sizes}, pad_token_id=256, bos_token_id=256,
                        eos_token_id=258, mask_token_id=MASK)  # fmt: skip
    m = CoDAForMaskedDiffusion(config).eval()
    with torch.no_grad():
        m.lm_head.weight[MASK] = 0
    return m


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return bidirectional()


def prompt(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def commits(input_ids: torch.Tensor, history: list[torch.Tensor], n: int) -> list[list[int]]:
    """Tokens committed per step and row (masks that became something else)."""
    prev, out = torch.nn.functional.pad(input_ids, (0, n), value=MASK), []
    for x in history:
        out.append(((prev == MASK) & (x != MASK)).sum(1).tolist())
        prev = x
    return out


def counting(model: nn.Module) -> list[int]:
    """Counts the decoder's forwards (both the full and the fast path run it once per model evaluation)."""
    calls = [0]
    model.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


class Table(nn.Module):
    """Fake model: the *shifted* logits at position j are table[j] whatever x is (the raw output is stored one
    position to the left, as the sampler right-shifts it)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.raw = torch.cat([table[1:], table[:1]])
        self.config = SimpleNamespace(mask_token_id=table.shape[-1] - 1)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor):
        self.calls += 1
        return SimpleNamespace(logits=self.raw.expand(input_ids.shape[0], -1, -1).clone())


def table_of(*dists: list[float], vocab: int = 8) -> torch.Tensor:
    """Logits [1 + len(dists), vocab]: log-probabilities of the given distributions (padded with zeros) after
    a one-token prompt; the last id (the mask) is never predicted."""
    rows = [[1.0] + [0.0] * (vocab - 1)] + [d + [0.0] * (vocab - len(d)) for d in dists]
    return torch.tensor(rows).clamp_min(1e-30).log().clamp_min(-1e4)


@pytest.mark.parametrize("alg", DETERMINISTIC)
def test_one_token_per_step_when_steps_equal_tokens(model, alg):
    ids, n = prompt(), 12
    out, history = diffusion_generate(model, ids, max_new_tokens=n, alg=alg, return_history=True)
    assert commits(ids, history, n) == [[0, 0]] + [[1, 1]] * (n - 2) + [[2, 2]]
    assert torch.equal(out[:, : ids.shape[1]], ids) and not (out == MASK).any()
    assert len(history) == n and torch.equal(history[-1], out)


@pytest.mark.parametrize("n,steps", [(24, 7), (24, 5), (10, 25)])
def test_commit_counts_follow_the_float32_formula(model, n, steps):
    ts = torch.linspace(1, 1e-3, steps + 1)
    left, expected = n, []
    for i in range(steps):
        k = left if i == steps - 1 else int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i]))
        expected.append([k, k])
        left -= k
    ids = prompt()
    _, history = diffusion_generate(model, ids, max_new_tokens=n, steps=steps, alg="entropy", return_history=True)
    assert commits(ids, history, n) == expected


def test_each_alg_ranks_by_its_own_confidence():
    a = [0.6, 0.3] + [0.1 / 6] * 6  # highest top-1 probability
    b = [0.55] + [0.45 / 7] * 7  # highest top1 - top2 margin (0.49 vs 0.3 and 0.04)
    c = [0.52, 0.48]  # lowest entropy (0.69 nats vs 1.08 and 1.56)
    first = {"maskgit_plus": a, "topk_margin": b, "entropy": c}
    order = [b, c, a]  # positions 1, 2, 3 after the prompt
    for alg, want in first.items():
        model = Table(table_of(*order, vocab=9))
        ids = torch.zeros(1, 1, dtype=torch.long)
        # 3 tokens in 2 steps: step 0 commits int(3 · (1 - 0.5005)) = 1 token, the most confident
        _, history = diffusion_generate(model, ids, max_new_tokens=3, steps=2, alg=alg, return_history=True)
        committed = (history[0][0] != model.config.mask_token_id).nonzero().flatten().tolist()
        assert committed == [0, 1 + order.index(want)], alg
        assert history[1][0, 1:].tolist() == [0, 0, 0]  # then the argmax everywhere
        assert model.calls == 2


def test_confidences_match_their_formulas():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(-1)
    top = p.sort(-1, descending=True).values
    want = {"maskgit_plus": top[:, 0], "topk_margin": top[:, 0] - top[:, 1],
            "entropy": (p * (p + 1e-10).log()).sum(-1)}  # fmt: skip
    for variant, conf in want.items():
        c, x0 = sample_tokens(logits, variant=variant)
        assert torch.equal(x0, logits.argmax(-1)) and torch.allclose(c, conf), variant


def test_top_p_and_top_k_match_an_explicit_reference():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(3)) * 2
    for top_p in (0.3, 0.75, 0.9, 1.0):
        kept = top_p_filter(logits, top_p) > torch.finfo(logits.dtype).min
        for row, keep in zip(logits, kept, strict=True):
            probs, order, mass, want = row.softmax(-1).tolist(), row.argsort(descending=True).tolist(), 0.0, set()
            for tok in order:  # add tokens by decreasing probability until the mass exceeds top_p
                want.add(tok)
                mass += probs[tok]
                if mass > top_p:
                    break
            assert set(keep.nonzero().flatten().tolist()) == want, top_p
    for k in (1, 3, 10, 50):
        kept = top_k_filter(logits, k) > torch.finfo(logits.dtype).min
        assert torch.equal(kept.sum(-1), torch.full((6,), min(k, 10)))
        assert (logits.masked_fill(~kept, math.inf).min(-1).values >= logits.topk(min(k, 10)).values[:, -1]).all()
    # the confidence is that of the filtered, temperature-scaled distribution, at temperature 0 too
    conf, x0 = sample_tokens(logits, temperature=0.0, top_k=2)
    two = logits.topk(2).values
    assert torch.equal(x0, logits.argmax(-1)) and torch.allclose(conf, two.softmax(-1)[:, 0])
    conf, _ = sample_tokens(logits, temperature=0.5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert ((conf > 0) & (conf <= 1)).all()


@pytest.mark.parametrize("alg", DETERMINISTIC)
def test_batch_equals_rows_one_by_one(model, alg):
    ids = prompt(2, 6, seed=4)
    both = diffusion_generate(model, ids, max_new_tokens=10, steps=6, alg=alg)
    one = [diffusion_generate(model, ids[r : r + 1], max_new_tokens=10, steps=6, alg=alg) for r in range(2)]
    assert torch.equal(both, torch.cat(one))


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_fast_is_exact(alg, steps):
    model, ids, n = bidirectional(), prompt(), 10
    calls = counting(model)
    kw = dict(max_new_tokens=n, steps=steps, alg=alg, temperature=0.0 if alg != "origin" else 0.7)
    exact = diffusion_generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    n_exact, calls[0] = calls[0], 0
    fast = diffusion_generate(model, ids, generator=torch.Generator().manual_seed(5), fast=True, **kw)
    assert torch.equal(exact, fast)
    assert n_exact == steps
    if steps > n and alg != "origin":  # some steps commit nothing: their forward is skipped
        assert calls[0] < steps
    else:
        assert calls[0] <= steps
    head = diffusion_generate(model, ids, generator=torch.Generator().manual_seed(5), masked_head=True, **kw)
    # masked_head is exact in real arithmetic, not bitwise (the sampler's docs): a token may differ where two
    # confidences tie within the last bit, so the claim tested is the same length, no mask left, nearly all equal
    assert head.shape == exact.shape and not (head[:, ids.shape[1]:] == MASK).any()
    assert (head == exact).float().mean() >= 0.9


def test_fast_head_rows_equal_the_full_logits(model):
    x = torch.nn.functional.pad(prompt(), (0, 9), value=MASK)
    x[0, 8] = 3  # rows with different masks
    active = x == MASK
    full, rows = _Predictor(model, fast=False, masked_head=False)(x, active)
    none, fast_rows = _Predictor(model, fast=True, masked_head=True)(x, active)
    assert none is None and fast_rows.shape == (int(active.sum()), 260)
    torch.testing.assert_close(fast_rows, rows, rtol=0, atol=1e-5)
    assert torch.equal(full[:, 1:], model(input_ids=x).logits[:, :-1])  # the right shift


def test_fast_with_hooks_equals_exact(model):
    ids = prompt()
    hook = lambda i, x, logits: logits.mul_(1.5)  # edits in place: must not leak into the reused logits
    kw = dict(max_new_tokens=8, steps=20, alg="topk_margin", logits_hook=hook)
    exact = diffusion_generate(model, ids, **kw)
    assert torch.equal(exact, diffusion_generate(model, ids, fast=True, **kw))  # fast reuse is bitwise


def test_origin_sampling_is_reproducible_and_fills_everything(model):
    ids = prompt()
    kw = dict(max_new_tokens=12, steps=6, alg="origin", temperature=1.0, top_p=0.95, top_k=50)
    runs = [diffusion_generate(model, ids, generator=torch.Generator().manual_seed(s), **kw) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    for steps in (1, 5):
        out, history = diffusion_generate(model, ids, max_new_tokens=12, steps=steps, alg="origin",
                                          generator=torch.Generator().manual_seed(0), return_history=True)  # fmt: skip
        assert (history[-2] == MASK).any() if steps > 1 else True  # something was left for the last step
        assert not (out == MASK).any() and torch.equal(out[:, :6], ids)


def test_alg_temp_draws_positions_reproducibly(model):
    ids = prompt()
    kw = dict(max_new_tokens=12, steps=4, alg="entropy", alg_temp=0.5)
    runs = [diffusion_generate(model, ids, generator=torch.Generator().manual_seed(1), **kw) for _ in range(2)]
    assert torch.equal(*runs) and not (runs[0] == MASK).any()


def test_hooks_are_called_and_can_force_tokens(model):
    ids, seen = prompt(), []

    def tokens_hook(step, x, logits):
        seen.append((step, logits is None))
        x[:, 6] = 65  # pin the first generated token
        return x

    def logits_hook(step, x, logits):
        assert logits.shape == (2, 14, 260)
        logits[:, :, 42] += 100  # force token 42 wherever the sampler still chooses
        return logits

    out = diffusion_generate(model, ids, max_new_tokens=8, steps=4, alg="entropy", tokens_hook=tokens_hook,
                             logits_hook=logits_hook)  # fmt: skip
    assert seen == [(None, True), (0, False), (1, False), (2, False), (3, False)]
    assert (out[:, 6] == 65).all() and (out[:, 7:] == 42).all() and torch.equal(out[:, :6], ids)


@pytest.mark.parametrize(
    "kw",
    [dict(alg="greedy"), dict(max_new_tokens=0), dict(steps=0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
     dict(temperature=-1.0), dict(alg_temp=-0.1), dict(eps=1.0), dict(block_length=5), dict(stop_at=3),
     dict(block_length=2, steps=6)],
)  # fmt: skip
def test_invalid_arguments(model, kw):
    with pytest.raises(ValueError):
        diffusion_generate(model, prompt(), **(dict(max_new_tokens=8, alg="entropy") | kw))


def test_invalid_alg_names_the_valid_ones(model):
    with pytest.raises(ValueError, match="origin, maskgit_plus, topk_margin, entropy"):
        diffusion_generate(model, prompt(), max_new_tokens=4, alg="greedy")
    with pytest.raises(ValueError, match="mask_token_id"):
        diffusion_generate(SimpleNamespace(config=SimpleNamespace()), prompt(), max_new_tokens=4)


def test_block_mode_commits_block_by_block(model):
    ids, n, block = prompt(), 12, 4
    out, history = diffusion_generate(model, ids, max_new_tokens=n, steps=6, alg="entropy", block_length=block,
                                      return_history=True)  # fmt: skip
    prev = torch.nn.functional.pad(ids, (0, n), value=MASK)
    for i, x in enumerate(history):
        lo = 6 + (i // 2) * block  # 3 blocks, 2 steps each
        new = ((prev == MASK) & (x != MASK)).nonzero()[:, 1]
        assert ((new >= lo) & (new < lo + block)).all(), i
        assert not (x[:, 6 : lo + block] == MASK).any() if i % 2 == 1 else True  # the block is done
        assert (x[:, lo + block :] == MASK).all()  # later blocks untouched
        prev = x
    assert not (out == MASK).any()
    # one block is the reference algorithm
    ref = diffusion_generate(model, ids, max_new_tokens=n, steps=6, alg="entropy")
    assert torch.equal(diffusion_generate(model, ids, max_new_tokens=n, steps=6, alg="entropy", block_length=n), ref)
    fast = diffusion_generate(model, ids, max_new_tokens=n, steps=6, alg="entropy", block_length=block, fast=True)
    assert torch.equal(fast, out)


def test_block_mode_stops_early_at_the_stop_token():
    model, ids = bidirectional(), prompt(1)
    calls = counting(model)
    kw = dict(max_new_tokens=16, steps=16, alg="maskgit_plus", block_length=4)
    full = diffusion_generate(model, ids, **kw)
    assert calls[0] == 16
    stop, calls[0] = int(full[0, 7]), 0  # a token the first block commits
    out = diffusion_generate(model, ids, stop_at=stop, **kw)
    assert calls[0] == 4  # one block of 4 steps
    assert torch.equal(out[:, :10], full[:, :10]) and (out[:, 10:] == stop).all()


def test_mask_ids_in_the_prompt_are_filled_like_the_reference(model):
    ids = prompt()
    ids[:, 2] = MASK  # a hole in the prompt: the reference treats it as one more position to generate
    out = diffusion_generate(model, ids, max_new_tokens=6, alg="entropy")
    assert not (out == MASK).any() and torch.equal(out[:, [0, 1, 3, 4, 5]], ids[:, [0, 1, 3, 4, 5]])
    block = diffusion_generate(model, ids, max_new_tokens=6, alg="entropy", block_length=3)
    assert (block[:, 2] == MASK).all()  # block mode only generates the answer region
