"""Training losses for both families, as one weighted next-token cross-entropy.

Both families are trained to predict token i+1 from the logits at position i (CoDA keeps the AR shift of the
Qwen3 it was initialised from). They differ only in what the model sees and which positions count, so a
micro-batch becomes an `Example` and one loss serves both:

    loss = Σ_{b,i} weight[b,i] · CE(logits[b,i], targets[b,i]) / norm,      targets[b,i] = ids[b,i+1]

    causal (qwen3)      inputs = ids; weight = 1 on supervised targets (all of a packed row; in chat/SFT rows
                        the response, not the prompt or padding); norm = Σ weight (the mean over targets)
    masked diffusion    sigma_b ~ U(eps, 1) per sequence; each maskable position is replaced by <|mask|> with
    (coda)              probability sigma_b; inputs = the noised ids; weight = 1/sigma_b where the *target* is
                        masked, else 0; norm = B·L (all positions, padding included). This is CoDA's loss
                        (coda.md §3): the 1/sigma weighting makes Σ weight·CE / (B·L) an unbiased estimate of
                        the per-token ELBO term, since a position is masked with probability sigma.

Diffusion options, all from CoDA's recipes (`DiffusionConfig`):
    SFT rows          `src_mask` marks the prompt (up to and including `<|im_start|>assistant`): never masked.
                      Right padding is maskable and supervised, which is how CoDA learns where answers end.
    S1 prefix         (rows without src_mask) with probability prefix_prob a row keeps a random prefix
                      [0, randint(1, L-1)) unmasked
    S2 truncation     with probability truncate_prob a row not chosen for S1 has a random suffix replaced by
                      padding, which is never masked (so never supervised)
    S3 block masking  with probability block_prob a batch masks contiguous windows of k ∈ block_sizes tokens
                      (one k per batch): each window of k maskable tokens is chosen with probability
                      1 − (1 − sigma)^(1/k), so an interior token stays masked with marginal probability sigma.
                      (The reference only tests block_probability > 0, i.e. masks every batch in blocks when it
                      is positive; block_prob = 1 reproduces that.)

Distillation (`kd_loss`) uses the same example: T² · KL(teacher ‖ student) of the softened predictions,
weighted and normalised like the CE, so for CoDA the teacher (the float model) sees the same noised input,
and only the masked positions count, with the same 1/sigma weights. Everything is computed in float32, and
only on the rows with non-zero weight (for a 151k vocabulary the upcast logits are the largest tensor); the
trainer and the held-out score run the LM head itself on those rows only (`scored_head`), and with T = 1 the
student's log-softmax is computed once for KD and the logged CE.
Random draws take an explicit `generator`, which the trainer seeds from (seed, rank, step, micro-batch):
noise is then a pure function of the position in training, and resuming reproduces it without saving RNG.

The held-out metric (`heldout_loss`: eval.heldout and the trainer's validation) is a plain NLL per scored token:
every target for AR models; for diffusion the masked targets at each mask ratio of HELDOUT_RATIOS with fixed
masks (a seeded generator), averaged over the grid. Unweighted, so comparable across checkpoints of one family.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Example:
    """One micro-batch as the loss sees it. `masked`/`sigma` are set for diffusion examples (for inspection)."""

    inputs: Tensor  # [B, L] token ids fed to the model
    targets: Tensor  # [B, L-1] the token each position i predicts (ids[:, i+1])
    weight: Tensor  # [B, L-1] float32 loss weight per position
    norm: Tensor | float  # loss = Σ weight · CE / norm
    masked: Tensor | None = None  # [B, L] bool: positions replaced by the mask token
    sigma: Tensor | None = None  # [B] masking ratio per sequence


def causal_example(ids: Tensor, src_mask: Tensor | None = None, valid: Tensor | None = None) -> Example:
    """Next-token prediction on `ids`; `src_mask` (prompt) and `~valid` (padding) targets are not supervised."""
    weight = torch.ones_like(ids[:, 1:], dtype=torch.float32)
    if src_mask is not None:
        weight = weight * ~src_mask[:, 1:]
    if valid is not None:
        weight = weight * valid[:, 1:]
    return Example(ids, ids[:, 1:], weight, weight.sum().clamp(min=1.0))


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, device=like.device, generator=generator)


def _randint(low: int, high: int, n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randint(low, high, (n,), device=like.device, generator=generator)


def block_mask(maskable: Tensor, sigma: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Union of chosen k-windows: a window of k maskable tokens is chosen w.p. 1 − (1 − sigma)^(1/k)."""
    B, L = maskable.shape
    if k > L:
        return torch.zeros_like(maskable)
    # windows[b, w] = all of maskable[b, w : w + k]
    whole = maskable.float().unfold(1, k, 1).amin(-1).bool()  # [B, L-k+1]
    p_win = 1 - (1 - sigma[:, None]) ** (1.0 / k)
    chosen = whole & (_rand(tuple(whole.shape), maskable, generator) < p_win)
    # position j is masked iff a chosen window starts in [j-k+1, j]: a sliding max over the start flags
    starts = F.pad(chosen.float(), (k - 1, k - 1))
    return starts.unfold(1, k, 1).amax(-1).bool()[:, :L]


def diffusion_example(
    ids: Tensor,
    mask_id: int,
    *,
    src_mask: Tensor | None = None,
    pad_id: int | None = None,
    eps: float = 1e-3,
    prefix_prob: float = 0.0,
    truncate_prob: float = 0.0,
    block_prob: float = 0.0,
    block_sizes: tuple[int, ...] | list[int] = (),
    generator: torch.Generator | None = None,
    sigma: Tensor | None = None,
) -> Example:
    """CoDA's masked-diffusion noising of a batch of clean `ids` (see the module docstring). `sigma` [B] fixes
    the masking ratios instead of drawing them (diffusion-aware calibration uses a grid)."""
    B, L = ids.shape
    maskable = torch.ones_like(ids, dtype=torch.bool) if src_mask is None else ~src_mask.bool()
    if src_mask is None and (prefix_prob > 0 or truncate_prob > 0):
        positions = torch.arange(L, device=ids.device)[None]
        prefix = _rand((B,), ids, generator) < prefix_prob
        trunc = (_rand((B,), ids, generator) < truncate_prob) & ~prefix  # S2 only on rows without S1
        if prefix_prob > 0:
            plen = _randint(1, L, B, ids, generator)
            maskable &= ~(prefix[:, None] & (positions < plen[:, None]))
        if truncate_prob > 0:
            if pad_id is None:
                raise ValueError("truncation (S2) needs pad_id")
            cut = _randint(1, L, B, ids, generator)
            ids = ids.masked_fill(trunc[:, None] & (positions >= cut[:, None]), pad_id)
            maskable &= ids != pad_id  # padding (added here or already there) is never masked
    sigma = (1 - eps) * _rand((B,), ids, generator) + eps if sigma is None else sigma.to(ids.device, torch.float32)
    k = 1
    if block_sizes and block_prob > 0 and _rand((1,), ids, generator).item() < block_prob:
        k = int(block_sizes[_randint(0, len(block_sizes), 1, ids, generator).item()])
    if k == 1:
        masked = (_rand((B, L), ids, generator) < sigma[:, None]) & maskable
    else:
        masked = block_mask(maskable, sigma, k, generator)
    noisy = ids.masked_fill(masked, mask_id)
    weight = masked[:, 1:].float() / sigma[:, None]
    return Example(noisy, ids[:, 1:], weight, float(B * L), masked, sigma)


def example(family: str, batch: dict[str, Tensor], model_config, diffusion, generator=None) -> Example:
    """The family's Example for a collated batch (`input_ids`, optional `src_mask`, `valid`); `diffusion` is
    the recipe's DiffusionConfig, `model_config` supplies the mask and pad ids."""
    ids = batch["input_ids"]
    if family != "coda":
        return causal_example(ids, batch.get("src_mask"), batch.get("valid"))
    d = diffusion
    return diffusion_example(
        ids, model_config.mask_token_id, src_mask=batch.get("src_mask"), pad_id=model_config.pad_token_id,
        eps=d.eps, prefix_prob=d.prefix_prob, truncate_prob=d.truncate_prob, block_prob=d.block_prob,
        block_sizes=d.block_sizes, generator=generator,
    )  # fmt: skip


def noise_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A generator seeded by a hash of `keys` (seed, rank, step, micro-batch): independent streams per key."""
    digest = hashlib.blake2b("/".join(map(str, keys)).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def _selected(logits: Tensor, ex: Example) -> tuple[Tensor, Tensor]:
    """(float32 logits, weights) of the positions that carry weight: [N, V], [N]; or, when every position does
    and the logits are float32 already (AR pretraining rows), [B, L−1, V] and [B, L−1] as a view: no copy of the
    largest tensor of the step, and no scatter back in the backward pass. `logits` are the model's raw [B, L, V],
    or already those of the scored positions only (`scored_head`: [B, L−1, V] or [N, V])."""
    sel = ex.weight > 0
    if logits.dim() == 2:  # [N, V]: the head ran on the selected positions only
        return logits.float(), ex.weight[sel]
    if logits.shape[1] == ex.weight.shape[1]:  # [B, L−1, V]: the head ran on every scored position
        return logits.float(), ex.weight
    if logits.dtype == torch.float32 and bool(sel.all()):
        return logits[:, :-1], ex.weight
    return logits[:, :-1][sel].float(), ex.weight[sel]


def scored_positions(ex: Example) -> Tensor | None:
    """The positions a loss on `ex` reads, for `scored_head`: None when every one is (AR packed rows), else the
    [B, L−1] bool selection (masked targets for diffusion, supervised ones for SFT rows)."""
    sel = ex.weight > 0
    return None if bool(sel.all()) else sel


@contextlib.contextmanager
def scored_head(model: torch.nn.Module, sel: Tensor | None) -> Iterator[None]:
    """Within this context the LM head of `model` (its output embeddings) runs only on the positions a loss reads:
    `hidden[:, :-1]` when `sel` is None (logits [B, L−1, V]), else `hidden[:, :-1][sel]` (logits [N, V]), instead
    of every position. The head is a third of a small model's FLOPs and its [B, L, V] output the largest tensor
    of a step: a masked-diffusion loss reads 10–90 % of it, and even an AR loss drops the last position, whose
    slice of the logits would cost a zero-filled [B, L, V] gradient and a copy in the backward. Works through any
    wrapper (DDP, DeepSpeed, PEFT) because it is a forward pre-hook on the head module itself; what the model
    does after its head must be position-wise (as HF's logit soft-capping is). `model` is the unwrapped model;
    a model without output embeddings runs whole (the loss then selects from the full logits)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        yield
        return

    def pick(_module, args):
        h = args[0][:, :-1]  # contiguous either way: one [B·(L−1), H] matmul, not a batched one over a strided view
        return (h.contiguous() if sel is None else h[sel], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def log_probs(logits: Tensor, ex: Example, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(log-softmax of logits / T at the scored positions, their weights): see `_selected` for the shapes.
    T = 1 divides by nothing (x / 1 is x: a [N, V] pass, and its backward's, saved)."""
    lg, w = _selected(logits, ex)
    return F.log_softmax(lg if temperature == 1 else lg / temperature, -1), w


def nll(log_p: Tensor, w: Tensor, ex: Example) -> Tensor:
    """Σ weight · (−log p[target]) / norm, from `log_probs` output."""
    targets = ex.targets if log_p.dim() == 3 else ex.targets[ex.weight > 0]
    return (-log_p.gather(-1, targets[..., None])[..., 0] * w).sum() / ex.norm


def ce_loss(logits: Tensor, ex: Example) -> Tensor:
    """Σ weight · CE(logits[:, i], targets[:, i]) / norm; logits are the model's raw, unshifted [B, L, V] (or
    the scored positions', see `_selected`). F.cross_entropy's arithmetic, at any rank."""
    return nll(*log_probs(logits, ex), ex)


def kl(log_s: Tensor, log_t: Tensor, w: Tensor, ex: Example, temperature: float = 1.0, reverse: float = 0.0
       ) -> Tensor:  # fmt: skip
    """T² · Σ weight · KL / norm from the softened log-probabilities of student and teacher (`log_probs`),
    KL = (1 − reverse) · KL(teacher ‖ student) + reverse · KL(student ‖ teacher)."""
    div = 0.0
    if reverse < 1:
        div = (1 - reverse) * F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    if reverse > 0:
        div = div + reverse * F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    return (div * w).sum() / ex.norm * temperature * temperature


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, ex: Example, temperature: float = 1.0,
            reverse: float = 0.0) -> Tensor:  # fmt: skip
    """T² · Σ weight · KL / norm on softened distributions (Hinton et al.; the T² keeps gradient magnitudes
    comparable across temperatures), KL = (1 − reverse) · KL(teacher ‖ student) + reverse · KL(student ‖ teacher):
    forward KL covers every mode of the teacher, reverse KL seeks its main ones (BitDistiller's CAKLD)."""
    log_s, w = log_probs(student_logits, ex, temperature)
    return kl(log_s, log_probs(teacher_logits, ex, temperature)[0], w, ex, temperature, reverse)


def hidden_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...]) -> Tensor:
    """Mean over decoder layers of ‖h_s − h_t‖² / ‖h_t‖², all positions: the relative error of each layer's
    output against the teacher's on the same inputs (HF `hidden_states`; index 0, the embeddings, is skipped).
    Intermediate-layer distillation (TernaryBERT, Zhang et al. 2020) gives every layer its own dense target
    instead of one KL at the end, which is what few-step low-bit QAT lacks; on the student's own inputs,
    so a layer also learns to correct the errors of the quantized layers before it."""
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-30)
             for s, t in zip(student[1:], teacher[1:], strict=True)]  # fmt: skip
    return torch.stack(terms).mean()


# The held-out metric (eval.heldout, the trainer's validation): AR NLL per token; diffusion masked-token NLL
# averaged over this grid of mask ratios, with fixed masks.
HELDOUT_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _logits_at(model, inputs: Tensor, sel: Tensor) -> Tensor:
    """model(inputs).logits[:, :-1][sel], with the LM head run only on the selected positions (`scored_head`)."""
    with scored_head(model, sel):
        logits = model(input_ids=inputs).logits
    return logits if logits.dim() == 2 else logits[:, :-1][sel]  # a model without output embeddings ran whole


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, family: str, ratios: list[float], seed: int = 0, batch_size: int = 8
                 ) -> dict[str, float]:  # fmt: skip
    """{"loss", "tokens", and per-ratio losses for diffusion} of `model` on windows `ids` [N, L]."""
    device = next(model.parameters()).device
    total, count, per_ratio = 0.0, 0, {}
    grid = ratios if family == "coda" else [None]
    for r in grid:
        r_total, r_count = 0.0, 0
        gen = torch.Generator(device=device).manual_seed(seed)
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            if r is None:
                ex = causal_example(batch)
            else:
                sigma = torch.full((len(batch),), r)
                ex = diffusion_example(batch, model.config.mask_token_id, sigma=sigma, generator=gen)
            sel = ex.weight > 0
            logits = _logits_at(model, ex.inputs, sel).float()
            r_total += float(F.cross_entropy(logits, ex.targets[sel], reduction="sum"))
            r_count += int(sel.sum())
        if r is not None:
            per_ratio[f"loss@{r:g}"] = r_total / max(r_count, 1)
        total, count = total + r_total / max(r_count, 1), count + r_count
    loss = total / len(grid)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, **per_ratio}
