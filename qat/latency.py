"""Measuring inference latency so that numbers from different models can be compared.

Latency per generated token: for an autoregressive model one decode step (one new token attending to a KV cache
of `context` tokens; the cache is cropped back before every call, so each call does the same work); for a
diffusion model a whole short generation by the reference sampler at one token per step (`diffusion_tokens`,
what eval.run runs) divided by its tokens, sampler work included. `denoise_step` times a single bare forward.

`interleaved` times several such callables the way the benchmarks do: a warm-up call each, then `rounds` rounds
that each call every candidate once, in an order rotated every round, so slow drifts of a shared machine (other
jobs, frequency changes) fall on all candidates alike; the result per candidate is the median and the spread
(min, max) of its rounds. A single timed call per model, as the study used before, gave 8–950 ms for identical
tiny models in one grid.

`label` says what a model computed with: device, dtype, and which QuantizedLinear paths (qat/kernels.py) ran.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qat.modules import QuantizedLinear


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    rounds: int


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 10, warmup: int = 1) -> dict[str, Timing]:
    """{name: Timing} over `rounds` interleaved rounds (module docstring)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(1000 * (time.perf_counter() - t0))
    return {n: Timing(statistics.median(s), min(s), max(s), rounds) for n, s in samples.items()}


def decode_step(model: nn.Module, context: int = 128, seed: int = 0) -> Callable[[], object]:
    """One autoregressive decode step after `context` tokens (KV cache prefilled once, cropped before each call)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    token = torch.randint(0, vocab, (1, 1), generator=gen).to(device)
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    position = torch.tensor([[context]], device=device)

    @torch.no_grad()
    def step():
        extra = cache.get_seq_length() - context
        if extra > 0:
            cache.crop(-extra)  # drop the previous call's token (transformers 5: a negative count removes)
        return model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True).logits

    return step


def denoise_step(model: nn.Module, window: int = 256, seed: int = 0) -> Callable[[], object]:
    """One denoising step: a full forward over a `window`-token sequence, half of it masked."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, window), generator=gen)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is not None:
        ids[:, window // 2 :] = mask_id
    ids = ids.to(device)

    @torch.no_grad()
    def step():
        return model(input_ids=ids).logits

    return step


def diffusion_tokens(model: nn.Module, prompt: int = 96, new: int = 32, seed: int = 0) -> Callable[[], object]:
    """`new` tokens generated after a `prompt`-token prompt by the reference sampler (steps = tokens, entropy, the
    lean forward: what eval.run runs), so that time / new is the latency per generated token."""
    from qat.models.sampler import diffusion_generate

    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)

    def run():
        return diffusion_generate(model, ids, max_new_tokens=new, steps=new, alg="entropy", lean=True, fast=True)

    return run


def step(model: nn.Module, family: str) -> tuple[Callable[[], object], str, int]:
    """(a callable, what it is, how many tokens one call generates): for Qwen3 one decode step, for CoDA a short
    generation with the reference sampler; time / tokens is the latency per generated token of either family."""
    if family == "coda":
        return diffusion_tokens(model), "32 tokens in 32 denoising steps after a 96-token prompt", 32
    return decode_step(model), "decode step, 128-token context", 1


def label(model: nn.Module) -> str:
    """Device, dtype and the paths the quantized linears took in their last call, e.g. 'cpu float32, int4×14'."""
    p = next(model.parameters())
    paths = Counter(m.last_path for m in model.modules() if isinstance(m, QuantizedLinear) and m.last_path)
    used = ", ".join(f"{k}×{v}" for k, v in sorted(paths.items())) or "float"
    return f"{p.device.type} {str(p.dtype).removeprefix('torch.')}, {used}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's tensors now (parameters, buffers, kernel layouts and dense caches), each
    storage once: what its weights occupy in memory."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m._dense for m in model.modules() if isinstance(m, QuantizedLinear) and m._dense is not None]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
