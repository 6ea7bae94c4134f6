"""The losses against their definitions: masking statistics, which targets count, SFT prompts, S1/S2/S3, KD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qat import objectives
from qat.objectives import block_mask, causal_example, ce_loss, diffusion_example, kd_loss

MASK, PAD, V = 99, 98, 100


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ids(B: int = 4, L: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 90, (B, L), generator=gen(seed))


def test_causal_is_mean_next_token_ce():
    x = ids()
    logits = torch.randn(*x.shape, V, generator=gen(1))
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(ce_loss(logits, causal_example(x)), ref)


def test_causal_sft_supervises_the_response_only():
    x = ids(2, 10)
    src = torch.zeros_like(x, dtype=torch.bool)
    src[:, :4] = True
    valid = torch.ones_like(src)
    valid[:, 8:] = False
    logits = torch.randn(*x.shape, V, generator=gen(1))
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(2, 9)
    # targets 4..7 (positions 3..6) are the response
    torch.testing.assert_close(ce_loss(logits, causal_example(x, src, valid)), ce[:, 3:7].mean())


def test_mask_rate_is_sigma():
    x = ids(16, 4096)
    ex = diffusion_example(x, MASK, generator=gen())
    rate = ex.masked.float().mean(1)
    assert ((rate - ex.sigma).abs() < 0.03).all()
    assert torch.equal(ex.inputs, x.masked_fill(ex.masked, MASK))
    assert ex.sigma.min() >= 1e-3 and ex.sigma.max() <= 1


@pytest.mark.parametrize("k", [2, 4, 8])
def test_block_masking_keeps_the_marginal_rate(k):
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.8])
    maskable = torch.ones(4, 8192, dtype=torch.bool)
    masked = block_mask(maskable, sigma, k, gen(k))
    interior = masked[:, k:-k].float().mean(1)
    assert ((interior - sigma).abs() < 0.05).all(), (interior, sigma)
    # masks come in runs of at least k
    edges = torch.diff(masked.int(), dim=1)
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
    runs = [e[1] - s[1] for s, e in zip(starts.tolist(), ends.tolist(), strict=False) if s[0] == e[0] and e[1] > s[1]]
    assert min(runs) >= k


def test_block_masking_respects_unmaskable_positions():
    maskable = torch.ones(2, 64, dtype=torch.bool)
    maskable[:, 10:20] = False
    masked = block_mask(maskable, torch.tensor([0.9, 0.9]), 4, gen())
    assert not (masked & ~maskable).any() and masked.any()


def test_only_masked_targets_count_with_weight_one_over_sigma():
    x = ids(3, 24)
    ex = diffusion_example(x, MASK, generator=gen(2))
    logits = torch.randn(*x.shape, V, generator=gen(3))
    B, L = x.shape
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(B, L - 1)
    ref = (ce * ex.masked[:, 1:] / ex.sigma[:, None]).sum() / (B * L)
    torch.testing.assert_close(ce_loss(logits, ex), ref)
    # logits at positions whose next token is visible do not matter
    other = logits.clone()
    visible = torch.cat([~ex.masked[:, 1:], torch.ones(B, 1, dtype=torch.bool)], 1)
    other[visible] = torch.randn(int(visible.sum()), V, generator=gen(4))
    torch.testing.assert_close(ce_loss(other, ex), ce_loss(logits, ex))


def test_sft_never_masks_the_prompt():
    x = ids(8, 40)
    src = torch.zeros_like(x, dtype=torch.bool)
    src[:, :15] = True
    ex = diffusion_example(x, MASK, src_mask=src, eps=1.0, generator=gen())  # sigma = 1: all else masked
    assert not ex.masked[:, :15].any() and ex.masked[:, 15:].all()
    assert torch.equal(ex.inputs[:, :15], x[:, :15])


def test_prefix_and_truncation():
    x = ids(64, 50)
    ex = diffusion_example(x, MASK, pad_id=PAD, eps=1.0, prefix_prob=0.5, truncate_prob=1.0, generator=gen())
    truncated = (ex.targets == PAD).any(1)
    prefixed = ~ex.masked[:, 0]  # with sigma = 1 an unmasked first token means an S1 prefix
    assert truncated.any() and prefixed.any() and not (truncated & prefixed).any()  # S2 only on non-S1 rows
    assert not (ex.masked[:, 1:] & (ex.targets == PAD)).any()  # padding is never masked
    for b in prefixed.nonzero().flatten().tolist():  # a prefix, then everything masked
        n = int((~ex.masked[b]).sum())
        assert 1 <= n < 50 and ex.masked[b, n:].all()


def test_kd_zero_for_identical_teacher_and_masked_only():
    x = ids(3, 24)
    ex = diffusion_example(x, MASK, generator=gen(5))
    s = torch.randn(*x.shape, V, generator=gen(6))
    assert kd_loss(s, s.clone(), ex, 2.0) == 0
    t = torch.randn(*x.shape, V, generator=gen(7))
    assert kd_loss(s, t, ex) > 0
    visible = torch.cat([~ex.masked[:, 1:], torch.ones(3, 1, dtype=torch.bool)], 1)
    t2 = t.clone()
    t2[visible] = 0
    torch.testing.assert_close(kd_loss(s, t2, ex), kd_loss(s, t, ex))


def test_noise_is_a_function_of_its_keys():
    x = ids()
    a = diffusion_example(x, MASK, generator=objectives.noise_generator("cpu", 0, 0, 5, 1))
    b = diffusion_example(x, MASK, generator=objectives.noise_generator("cpu", 0, 0, 5, 1))
    c = diffusion_example(x, MASK, generator=objectives.noise_generator("cpu", 0, 1, 5, 1))  # another rank
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)


def test_hidden_loss_is_the_mean_relative_layer_error_without_embeddings():
    g = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(4))
    assert objectives.hidden_loss(teacher, teacher).item() == 0.0
    noise = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    student = (teacher[0] + 100.0, *(t + n for t, n in zip(teacher[1:], noise[1:], strict=True)))  # embeddings ignored
    want = sum((n.pow(2).sum() / t.pow(2).sum()).item() for t, n in zip(teacher[1:], noise[1:], strict=True)) / 3
    assert objectives.hidden_loss(student, teacher).item() == pytest.approx(want, rel=1e-6)


def test_reverse_kd_is_kl_of_student_to_teacher():
    """kd_reverse mixes KL(t‖s) and KL(s‖t) linearly; reverse=1 is the forward loss with the roles swapped."""
    x = ids(2, 16)
    ex = causal_example(x)
    s, t = torch.randn(*x.shape, V, generator=gen(8)), torch.randn(*x.shape, V, generator=gen(9))
    fwd, rev = kd_loss(s, t, ex), kd_loss(s, t, ex, reverse=1.0)
    torch.testing.assert_close(rev, kd_loss(t, s, ex))
    assert not torch.allclose(fwd, rev)
    torch.testing.assert_close(kd_loss(s, t, ex, reverse=0.3), 0.7 * fwd + 0.3 * rev)
    assert kd_loss(s, s.clone(), ex, reverse=0.5) == 0


def _micro(name: str):
    from qat.models import load
    from tests.conftest import ROOT

    return load(ROOT / "checkpoints" / name)[0]


@pytest.mark.parametrize("name", ["micro-qwen3", "micro-coda"])
def test_scored_head_gives_the_full_forward_losses_and_gradients(name):
    """The LM head run only on the scored positions (`scored_head`: [B, L−1, V] for AR rows, [N, V] for masked
    diffusion) gives the losses and parameter gradients of the full [B, L, V] forward, for CE and KD."""
    model = _micro(name)
    x = torch.randint(0, 256, (3, 24), generator=gen(7))
    ex = (diffusion_example(x, model.config.mask_token_id, generator=gen(8)) if name == "micro-coda"
          else causal_example(x))  # fmt: skip
    sel = objectives.scored_positions(ex)
    assert (sel is None) == (name == "micro-qwen3")
    teacher = torch.randn(3, 24, model.config.vocab_size, generator=gen(9))

    def loss_and_grads(scored: bool):
        model.zero_grad()
        with objectives.scored_head(model, sel) if scored else torch.enable_grad():
            logits = model(input_ids=ex.inputs).logits
        assert logits.dim() == (2 if scored and sel is not None else 3)
        if scored:
            assert logits.shape[-2] == (ex.weight.shape[1] if sel is None else int(sel.sum()))
        t = teacher[:, :-1][ex.weight > 0] if scored and sel is not None else teacher[:, :-1] if scored else teacher
        loss = ce_loss(logits, ex) + kd_loss(logits, t, ex, 2.0, 0.3)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_g = loss_and_grads(False)
    got, got_g = loss_and_grads(True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone after the context


def test_temperature_one_divides_by_nothing_and_ce_reuses_kd_log_softmax():
    """T = 1 skips the division (x / 1 is x, bit for bit); the trainer's logged CE read off KD's student
    log-softmax equals `ce_loss`."""
    x = ids()
    ex = diffusion_example(x, MASK, generator=gen(3))
    s = torch.randn(*x.shape, V, generator=gen(4))
    log_s, w = objectives.log_probs(s, ex)
    assert torch.equal(log_s, F.log_softmax(s[:, :-1][ex.weight > 0], -1))
    assert torch.equal(objectives.nll(log_s, w, ex), ce_loss(s, ex))
