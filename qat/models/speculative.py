"""Lossless draft-and-verify decoding for the reference sampler (in the spirit of FreeDave and Spiffy).

The reference commits k_t tokens at step t, the k_t masked positions its step-t logits are most confident about.
Those logits also rank what the next steps will probably commit, so one forward can be turned into several
steps' worth of guesses, and one batched forward can check them all:

    from an exact state x_s and its logits:
        x_{s+1}            commit step s from the logits of x_s                       (exact: the reference's step)
        x_{s+2} … x_{s+d}  commit steps s+1 … s+d−1 from the same logits of x_s, each among the positions still
                           masked, with the reference's k for that step               (drafts)
    one forward over the d states x_{s+1} … x_{s+d} (stacked as a batch) gives each one's real logits;
    walking j = 1 … d−1: the reference's step s+j, computed from the real logits of x_{s+j}, is compared with
    the draft x_{s+j+1}; at the first difference the round ends at x_{s+j} (exact, logits known), else at x_{s+d}.

Every state kept was produced by the reference's own rule from its own logits, so the tokens are the reference
sampler's (up to last-bit rounding: a forward over more sequences may round differently, as `lean`), and each round
advances 1 … d steps for one forward over d sequences. That pays where d sequences cost about as much as one (a
GPU, whose forward at batch 1 is bound by reading the weights); on a CPU a forward costs in proportion to its
sequences, so this is slower there, and benchmarks/sampler.py shows it.

Covered: temperature 0 with the deterministic algorithms (maskgit_plus, topk_margin, entropy; no alg_temp), one
block, steps up to max_new_tokens. Not covered: sampling (lossless drafting of random draws needs the rejection
scheme of speculative sampling), hooks, block and cached modes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.models import sampler as S


@torch.inference_mode()
def generate(model, x: Tensor, *, steps: int, mask_id: int, alg: str, top_p: float | None, top_k: int | None,
             eps: float, draft: int, inputs: dict | None = None) -> tuple[Tensor, int]:  # fmt: skip
    """(x after `steps` reference steps, forwards run) for the masked sequence x [B, L] (module docstring)."""
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    predictors: dict[int, S._Predictor] = {}

    def logits_rows(states: list[Tensor]) -> list[Tensor]:
        """The active positions' logits of each state, from one forward over all of them."""
        n = len(states)
        if n not in predictors:  # rotary and padding inputs for n stacked copies of the batch
            tiled = {k: v.repeat(n, 1) for k, v in (inputs or {}).items()}
            predictors[n] = S._Predictor(model, fast=False, masked_head=False, inputs=tiled, lean=_lean_ok(model))
        stacked = torch.cat(states)
        active = stacked == mask_id
        rows = predictors[n](stacked, active)[1]
        return list(rows.split(active.view(n, -1).sum(1).tolist()))

    def step(state: Tensor, rows: Tensor, active: Tensor, i: int) -> Tensor:
        """The reference's step i from `rows` (the logits of the positions active in `state`)."""
        out = state.clone()
        k = S.commit_count(active, timesteps[i], timesteps[i + 1], i == steps - 1)
        if k > 0:
            confidence, x0 = S.sample_tokens(rows, 0.0, top_p, top_k, alg)
            S.commit_top(out, active, confidence, x0, k, mask_id)
        return out

    rows, forwards, s = logits_rows([x])[0], 1, 0
    while True:
        active = x == mask_id
        states = [step(x, rows, active, s)]  # exact
        for i in range(s + 1, min(s + draft, steps)):  # drafts: later steps from the same logits
            now = states[-1] == mask_id
            states.append(step(states[-1], rows[now[active]], now, i))
        final = s + len(states) == steps  # then the last state's own logits are never needed
        check = states[:-1] if final else states
        if not check:
            return states[-1], forwards
        real = logits_rows(check)
        forwards += 1
        kept = len(states)
        for j in range(1, len(states)):
            if not torch.equal(step(states[j - 1], real[j - 1], states[j - 1] == mask_id, s + j), states[j]):
                kept = j
                break
        if kept == len(states) and final:
            return states[-1], forwards
        x, rows, s = states[kept - 1], real[kept - 1], s + kept


def _lean_ok(model) -> bool:
    from qat.models.lean import LeanDecoder

    try:
        LeanDecoder(model)
    except TypeError:
        return False
    return True
