"""Block-wise approximate KV caching for diffusion sampling (Fast-dLLM's prefix and dual cache). NOT exact.

Semi-autoregressive decoding (the sampler's `block_length`) fills the answer block by block, left to right. While
block [s, e) is being filled, the tokens before it (prompt and finished blocks) no longer change and those after it
are still all masks; with bidirectional attention their hidden states still change a little at every step, since
they attend to the block, but Fast-dLLM observed that their keys and values barely do. So:

    at the start of each block   one full forward over all L positions (the `lean` forward, qat/models/lean.py),
                                 keeping every layer's keys and values; this step's logits are exact
    every later step             a forward over a window only, attending to the window's fresh K/V plus the
                                 cached K/V of the positions outside it:
        prefix                   window [s − 1, L): the block and everything after it; the prefix is cached
        dual                     window [s − 1, e): the block alone; the prefix and the suffix are cached

The window starts at s − 1 because hidden state j − 1 predicts token j (the right shift): the position before the
block reads no mask but produces the block's first prediction. A window step costs about window / L of a full
forward in the linear layers (e.g. 33 / 256 for a 32-token block after a 128-token prompt, dual cache) plus
attention over all L keys. What it gives up: the cached K/V are stale by up to one block of commits, so the logits,
and hence the tokens, differ from the uncached sampler's; the sampler's `threshold` (commit every masked position
whose chosen token has at least that probability, Fast-dLLM's parallel decoding) trades more of that for speed.
benchmarks/sampler.py measures both the speed and the agreement with the exact sampler.

Not covered: caching across calls (each `diffusion_generate` starts cold), sharing K/V across batch rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.models.lean import KV, LeanDecoder

MODES = ("prefix", "dual")


class BlockCachePredictor:
    """The sampler's predictor (x, active) -> (None, logits of the active positions) with a block-wise cache.
    `start_block(s, e)` before the first step of each block."""

    def __init__(self, model, mode: str, inputs: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"cache={mode!r}: expected one of {', '.join(MODES)}")
        self.lean, self.mode, self.inputs = LeanDecoder(model), mode, inputs or {}
        self.rope: tuple[Tensor, Tensor] | None = None
        self.span: tuple[int, int] = (0, 0)
        self.context: KV | None = None  # K/V of the positions outside the window
        self.outside: Tensor | None = None  # their indices
        self.forwards = {"full": 0, "window": 0}  # how many of each (reported by the benchmark)

    def start_block(self, s: int, e: int) -> None:
        if s < 1:
            raise ValueError("cached decoding needs a prompt of at least one token")
        self.span, self.context = (s, e), None

    def __call__(self, x: Tensor, active: Tensor) -> tuple[None, Tensor]:
        L = x.shape[1]
        if self.rope is None:
            self.rope = self.lean.sequence_rope(L, self.inputs.get("position_ids"))
        mask = self.inputs.get("attention_mask")
        mask = None if mask is None else mask.bool()
        b, j = active.nonzero(as_tuple=True)
        s, e = self.span
        if self.context is None:  # the block's first step: everything, exactly; keep the K/V of what stays outside
            logits, kv = self.lean.read_logits(x, self.rope, b, j, key_mask=mask, keep_kv=True)
            end = e if self.mode == "dual" else L
            self.outside = torch.cat([torch.arange(0, s - 1), torch.arange(end, L)]).to(x.device)
            self.context = kv.select(self.outside)
            self.forwards["full"] += 1
            return None, logits
        w0, w1 = s - 1, (e if self.mode == "dual" else L)
        cos, sin = self.rope
        logits, _ = self.lean.read_logits(
            x[:, w0:w1], (cos[:, w0:w1], sin[:, w0:w1]), b, j, start=w0, context=self.context,
            context_mask=None if mask is None else mask[:, self.outside],
            key_mask=None if mask is None else mask[:, w0:w1],
        )  # fmt: skip
        self.forwards["window"] += 1
        return None, logits
