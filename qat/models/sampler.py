"""Masked-diffusion sampling for CoDA: `diffusion_generate`, the reference (CoDA / Dream) sampler, token for token.

A diffusion LM generates by unmasking. The answer region starts as `max_new_tokens` copies of <|mask|> after
the prompt; each of `steps` forwards predicts every masked position at once and commits some of the
predictions, which are never masked again. What differs between algorithms is how many and which.

    x = prompt ‖ MASK^n                       (left padding; no attention mask: padding is attended, as in the
                                               reference; `attention_mask=` hides it, see diffusion_generate)
    t_i = linspace(1, eps, steps + 1)[i]      (float32; the "time" runs from 1 = all masked to eps)
    logits[:, j] = model(x).logits[:, j - 1]  (right shift: CoDA keeps the AR convention of its Qwen3 init,
                                               hidden state j-1 predicts token j; position 0 keeps its own)
    step i:  p(commit) = 1 - t_{i+1} / t_i    (the fraction of the still-masked tokens that a masked-diffusion
                                               process with linear schedule unmasks between t_i and t_{i+1};
                                               1 on the last step, so nothing stays masked)

    origin        every masked position independently, with probability p(commit), gets a token sampled
                  from its prediction
    maskgit_plus  k = int(n_mask · p(commit)) positions per row (all remaining ones on the last step), the k
    topk_margin   with the highest confidence: top-1 probability, top-1 − top-2 probability, or the negative
    entropy       entropy Σ p·log(p + 1e-10). n_mask is the number of masks averaged over the batch and the
                  product is float32 tensor arithmetic truncated by int(), as in the reference, so with
                  steps == max_new_tokens the commits per step are [0, 1, 1, ..., 1, 2]. With `alg_temp` > 0 the
                  k positions are drawn without replacement from softmax(confidence / alg_temp) instead.

Token scoring (`sample_tokens`) divides by the temperature (when > 0), then applies top-p (the smallest
prefix of the sorted distribution whose mass exceeds top_p, top-1 always kept) and top-k — both also at
temperature 0, where they change the confidences though not the argmax — then softmax in the logits' own
dtype (no upcast: bf16 parity). Temperature 0 takes the argmax; otherwise one draw from the categorical, through
`torch.distributions.Categorical` so that, like the reference, a distribution it rejects (in bf16 the
renormalised probabilities often miss |Σp − 1| < 1e-6) falls back to the argmax. Confidences are those of the
filtered, temperature-scaled distribution.

Reference quirks kept on purpose: mask ids inside the prompt are holes that get filled (infilling); k is
averaged over the batch, so when rows hold different numbers of masks (a tokens hook, holes in the prompt, or a
model that commits the mask id itself) a row may be asked for more positions than it has masks, and the extra
top-k picks (-inf confidence) write the mask id back over a prompt or committed token; nothing forbids
committing the mask id, so a mask can survive the last step.

Two speedups, both off by default:
  fast=True         when x is unchanged since the last forward (a step that committed nothing: k = 0, about
                    every other step when steps = 2 · max_new_tokens), the previous logits are reused: the forward
                    is a deterministic function of x. Bitwise the same tokens as the reference (and the random
                    draws are unaffected, since an eval-mode forward draws none). Free when steps <= new tokens.
  masked_head=True  the sampler only reads the logits of masked positions, lm_head(hidden[j - 1]) for each masked
                    j, so the head runs on those rows of `model.get_decoder()(x).last_hidden_state` only (about
                    n_mask / L of its cost; the head is a fifth of a CoDA-1.7B forward, and its [B, L, V] logits
                    the largest tensor of sampling). Exact in real arithmetic, but NOT bitwise: a matmul over fewer
                    rows may round differently in the last bit (CPU BLAS splits the reduction differently for
                    small row counts; bf16 and GPU libraries choose kernels by shape), so a token can differ where
                    two confidences tie to within that rounding (measured: 1 token of 512 in benchmarks/sampler.py).
                    It assumes `model(x).logits == lm_head(decoder(x))` (true for transformers' *ForCausalLM, so
                    Qwen3 and CoDA; not for heads with logit scaling or soft-capping), and is skipped when a hook is
                    given (hooks get the full logits) or the model has no separate decoder and head.

`block_length` (NOT the reference algorithm: outputs differ) is semi-autoregressive decoding in the style of
Fast-dLLM without its KV cache: the answer is split into blocks of `block_length` tokens decoded left to
right, each with steps // n_blocks steps and its own linspace schedule over the masks of that block only
(positions outside it have -inf confidence and are never committed, though the model still sees them). With
`stop_at` (an end-of-answer id such as <|im_end|>), once every row holds it in a finished block, the remaining
masks are filled with it and generation stops: fewer forwards for short answers. With one block and a prompt
without mask ids this is the reference algorithm.

Not covered: Dream's `confidence_threshold` algorithm, attention masks for left padding (the reference passes
none either), `num_return_sequences`, the `max_length` default (here `max_new_tokens` is required), KV caches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qat.models.block_cache import MODES as CACHE_MODES
from qat.models.block_cache import BlockCachePredictor
from qat.models.lean import LeanDecoder

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
TokensHook = Callable[[int | None, Tensor, Tensor | None], Tensor]  # (step, x, logits) -> x
LogitsHook = Callable[[int, Tensor, Tensor], Tensor]  # (step, x, logits) -> logits


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep the smallest prefix of the descending-sorted distribution whose cumulative
    probability exceeds top_p (the first token crossing it included, top-1 always); others get dtype min."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    over = sorted_logits.softmax(-1).cumsum(-1) > top_p
    # shift right by one: a token is removed only if the mass *before* it already exceeds top_p
    remove = torch.cat([torch.zeros_like(over[..., :1]), over[..., :-1]], dim=-1)
    remove = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Keep logits ≥ the k-th largest (ties at the boundary survive); others get dtype min."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: Tensor, temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
    variant: str = "maskgit_plus", generator: torch.Generator | None = None, with_prob: bool = False,
) -> tuple[Tensor, ...]:  # fmt: skip
    """(confidence [N], token [N]) for logits [N, V]; `variant` picks the confidence (see the module docstring).
    with_prob: also the chosen token's probability under the filtered, temperature-scaled distribution."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = logits.softmax(-1)
    if temperature > 0:
        try:  # Categorical renormalises and validates; the reference falls back to argmax when it refuses
            p = torch.distributions.Categorical(probs=probs).probs
            x0 = torch.multinomial(p, 1, replacement=True, generator=generator).squeeze(-1)
            confidence = probs.gather(-1, x0[:, None]).squeeze(-1)
        except (ValueError, RuntimeError):
            confidence, x0 = probs.max(-1)
    else:
        confidence, x0 = probs.max(-1)
    prob = confidence
    if variant == "topk_margin":
        top2 = probs.topk(2, dim=-1).values  # the same values as the reference's full sort
        confidence = top2[:, 0] - top2[:, 1]
    elif variant == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return (confidence, x0, prob) if with_prob else (confidence, x0)


def commit_count(active: Tensor, t: Tensor, s: Tensor, last: bool) -> int:
    """k of the reference: the masks averaged over the batch (a float32 tensor) times 1 − s/t, truncated."""
    n_mask = active.sum() / active.shape[0]
    return int(n_mask) if last else int(n_mask * (1 - s / t))


def commit_top(x: Tensor, active: Tensor, confidence: Tensor, x0: Tensor, k: int, mask_id: int,
               alg_temp: float | None = None, generator: torch.Generator | None = None) -> None:  # fmt: skip
    """Commit in place, per row, the k active positions of highest confidence (drawn from softmax(confidence /
    alg_temp) when alg_temp > 0) to their tokens x0 (given in the row-major order of x[active])."""
    full_conf = torch.full_like(x, -torch.inf, dtype=confidence.dtype)
    full_conf[active] = confidence
    if alg_temp:  # None or 0 → deterministic top-k
        idx = torch.multinomial((full_conf / alg_temp).softmax(-1), k, generator=generator)
    else:
        idx = full_conf.topk(k, dim=-1).indices
    candidates = torch.full_like(x, mask_id)
    candidates[active] = x0
    x.scatter_(1, idx, candidates.gather(1, idx))


class _Predictor:
    """The right-shifted logits a step needs, with the shortcuts fast (reuse), masked_head (head rows only) and
    lean (qat/models/lean.py: rotary once, the last layer and the head on the rows read, no logits copy)."""

    def __init__(self, model, fast: bool, masked_head: bool, inputs: dict | None = None, lean: bool = False):
        self.model, self.fast, self.inputs = model, fast, inputs or {}
        decoder = getattr(model, "get_decoder", lambda: None)()
        head = getattr(model, "get_output_embeddings", lambda: None)()
        self.split = (decoder, head) if masked_head and decoder is not None and head is not None else None
        self.lean = LeanDecoder(model) if lean else None
        self.rope: tuple[Tensor, Tensor] | None = None
        self.x: Tensor | None = None  # the input of the cached forward
        self.out: Tensor | None = None  # its shifted logits [B, L, V], or its hidden states when split
        self.active: Tensor | None = None  # the positions of the cached head rows (split and lean)
        self.rows: Tensor | None = None

    def __call__(self, x: Tensor, active: Tensor) -> tuple[Tensor | None, Tensor]:
        """(full shifted logits or None when split or lean, logits of the `active` positions [n_active, V])."""
        if self.lean is not None:
            return None, self._lean(x, active)
        if not (self.fast and self.x is not None and torch.equal(x, self.x)):
            self.x, self.rows = x.clone(), None  # x is edited in place later: keep a copy to compare
            if self.split:
                self.out = self.split[0](input_ids=x, use_cache=False, **self.inputs).last_hidden_state
            else:
                logits = self.model(input_ids=x, **self.inputs).logits
                self.out = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if not self.split:
            return self.out, self.out[active]
        if self.rows is None or not torch.equal(active, self.active):
            b, j = active.nonzero(as_tuple=True)  # row-major, the order of logits[active]
            self.rows, self.active = self.split[1](self.out[b, (j - 1).clamp_min(0)]), active.clone()
        return None, self.rows

    def _lean(self, x: Tensor, active: Tensor) -> Tensor:
        """Head rows of the active positions from the lean forward; reused while x and active are unchanged."""
        if self.fast and self.x is not None and torch.equal(x, self.x) and torch.equal(active, self.active):
            return self.rows
        if self.rope is None:
            self.rope = self.lean.sequence_rope(x.shape[1], self.inputs.get("position_ids"))
        b, j = active.nonzero(as_tuple=True)  # row-major, the order of logits[active]
        mask = self.inputs.get("attention_mask")
        self.rows = self.lean.read_logits(x, self.rope, b, j, key_mask=None if mask is None else mask.bool())[0]
        self.x, self.active = x.clone(), active.clone()
        return self.rows


def _check(
    max_new_tokens: int, steps: int, alg: str, temperature: float, top_p: float | None, top_k: int | None,
    alg_temp: float | None, eps: float, block_length: int | None, stop_at: int | None, cache: str | None = None,
    threshold: float | None = None,
) -> None:  # fmt: skip
    if alg not in ALGS:
        raise ValueError(f"alg={alg!r}: expected one of {', '.join(ALGS)}")
    if max_new_tokens < 1 or steps < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and steps={steps} must both be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if alg_temp is not None and alg_temp < 0:
        raise ValueError(f"alg_temp={alg_temp} must be >= 0")
    if not 0 <= eps < 1:
        raise ValueError(f"eps={eps} must be in [0, 1)")
    if stop_at is not None and block_length is None:
        raise ValueError("stop_at needs block_length: generation can only stop at the end of a finished block")
    if block_length is not None:
        if block_length < 1 or max_new_tokens % block_length:
            raise ValueError(f"block_length={block_length} must divide max_new_tokens={max_new_tokens}")
        if steps % (max_new_tokens // block_length):
            raise ValueError(f"steps={steps} must be a multiple of the number of blocks "
                             f"{max_new_tokens // block_length} (max_new_tokens / block_length)")  # fmt: skip
    if cache is not None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache={cache!r}: expected one of {', '.join(CACHE_MODES)}")
        if block_length is None:
            raise ValueError("cache needs block_length: the cache is refreshed at every block's start")
    if threshold is not None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        if alg == "origin":
            raise ValueError("threshold ranks positions by confidence: use maskgit_plus, topk_margin or entropy")


@torch.inference_mode()
def diffusion_generate(
    model, input_ids: Tensor, *, max_new_tokens: int, steps: int | None = None, alg: str = "origin",
    temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, alg_temp: float | None = None,
    eps: float = 1e-3, mask_token_id: int | None = None, tokens_hook: TokensHook | None = None,
    logits_hook: LogitsHook | None = None, generator: torch.Generator | None = None, fast: bool = False,
    masked_head: bool = False, lean: bool = False, return_history: bool = False, block_length: int | None = None,
    stop_at: int | None = None, attention_mask: Tensor | None = None, cache: str | None = None,
    threshold: float | None = None, draft: int = 0,
) -> Tensor | tuple[Tensor, list[Tensor]]:  # fmt: skip
    """Prompt + generated tokens [B, P + max_new_tokens] (and the x after every step if return_history).

    input_ids [B, P]: the prompts, left-padded if ragged (padding is attended, as in the reference). steps
    defaults to max_new_tokens; mask_token_id to model.config.mask_token_id. tokens_hook(step, x, logits) -> x
    runs once before the loop (step and logits None) and after every step; logits_hook(step, x, logits) ->
    logits sees the shifted logits [B, L, V] before scoring. `generator` drives every random draw (the global
    RNG when None). See the module docstring for the algorithms, `fast`, `masked_head` and `block_length` /
    `stop_at`. attention_mask [B, P] (1 = token, 0 = left padding; NOT the reference, which attends to padding):
    padding is hidden from attention and positions count from each row's first token, so a left-padded row
    generates exactly what the same prompt alone would (batch-size independent results)."""
    steps = max_new_tokens if steps is None else steps
    _check(max_new_tokens, steps, alg, temperature, top_p, top_k, alg_temp, eps, block_length, stop_at, cache,
           threshold)  # fmt: skip
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids [batch, prompt_len], got {tuple(input_ids.shape)}")
    mask_id = getattr(model.config, "mask_token_id", None) if mask_token_id is None else mask_token_id
    if mask_id is None:
        raise ValueError("no mask_token_id given and model.config has none")

    B, P = input_ids.shape
    x = torch.nn.functional.pad(input_ids, (0, max_new_tokens), value=mask_id)
    inputs = None
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {(B, P)}")
        full = torch.nn.functional.pad(attention_mask.to(x.device, torch.long), (0, max_new_tokens), value=1)
        inputs = {"attention_mask": full, "position_ids": (full.cumsum(1) - 1).clamp_min(0)}
    if draft:
        if draft < 2 or temperature or alg_temp or alg == "origin" or tokens_hook or logits_hook or return_history \
                or block_length or cache or threshold:  # fmt: skip
            raise ValueError("draft >= 2 (lossless draft-and-verify, qat/models/speculative.py) needs temperature 0, "
                             "maskgit_plus/topk_margin/entropy without alg_temp, one block, no cache, threshold, "
                             "hooks or history")  # fmt: skip
        from qat.models import speculative

        return speculative.generate(model, x, steps=steps, mask_id=mask_id, alg=alg, top_p=top_p, top_k=top_k,
                                    eps=eps, draft=draft, inputs=inputs)[0]  # fmt: skip
    if tokens_hook is not None:
        x = tokens_hook(None, x, None)
    hooked = tokens_hook is not None or logits_hook is not None
    if cache is not None:
        if hooked:
            raise ValueError("cache reads only the masked positions' logits: it takes no logits_hook or tokens_hook")
        predict = BlockCachePredictor(model, cache, inputs)
    else:
        predict = _Predictor(model, fast, masked_head=masked_head and not hooked, inputs=inputs,
                             lean=lean and not hooked)  # fmt: skip
    n_blocks = 1 if block_length is None else max_new_tokens // block_length
    block_steps, size = steps // n_blocks, max_new_tokens // n_blocks
    history, i = [], 0
    for block in range(n_blocks):
        region = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        region[P + block * size : P + (block + 1) * size] = True
        timesteps = torch.linspace(1, eps, block_steps + 1, device=x.device)
        if cache is not None:
            predict.start_block(P + block * size, P + (block + 1) * size)
        for step in range(block_steps):
            active = x == mask_id
            if block_length is not None:
                active &= region  # the reference (one block) also fills mask ids inside the prompt
            if threshold is not None and not active.any():
                break  # parallel commits finished the block early
            logits, rows = predict(x, active)
            if fast and logits is not None and (logits_hook or tokens_hook):
                logits = logits.clone()  # a hook may edit its logits in place: keep the reused copy clean
            if logits_hook is not None:
                logits = logits_hook(i, x, logits)
                rows = logits[active]
            t, s = timesteps[step], timesteps[step + 1]
            last = step == block_steps - 1
            if alg == "origin":
                p_transfer = 1 if last else 1 - s / t
                x0 = torch.full_like(x[active], mask_id)
                transfer = torch.rand(x0.shape, device=x.device, generator=generator) < p_transfer
                x0[transfer] = sample_tokens(rows[transfer], temperature, top_p, top_k, alg, generator)[1]
                x[active] = x0
            else:
                confidence, x0, prob = sample_tokens(rows, temperature, top_p, top_k, alg, generator, with_prob=True)
                k = commit_count(active, t, s, last)
                if threshold is not None:  # the schedule's k, plus every position as sure as the threshold
                    sure = torch.zeros_like(active)
                    sure[active] = prob >= threshold
                    k = max(k, 1)  # at least one commit per forward
                    full_conf = torch.full_like(x, -torch.inf, dtype=rows.dtype)
                    full_conf[active] = confidence
                    idx = full_conf.topk(min(k, x.shape[1]), dim=-1).indices
                    commit = sure.scatter(1, idx, True) & active
                    candidates = torch.full_like(x, mask_id)
                    candidates[active] = x0
                    x[commit] = candidates[commit]
                elif k > 0:
                    commit_top(x, active, confidence, x0, k, mask_id, alg_temp, generator)
            if tokens_hook is not None:
                x = tokens_hook(i, x, logits)
            if return_history:
                history.append(x.clone())
            i += 1
        if stop_at is not None and bool((x[:, P : P + (block + 1) * size] == stop_at).any(-1).all()):
            x[:, P:] = x[:, P:].masked_fill(x[:, P:] == mask_id, stop_at)  # every row has ended its answer
            break
    return (x, history) if return_history else x
