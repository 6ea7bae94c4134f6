"""Training losses. The AR/diffusion difference lives here and in the sampler; everything else is shared.

    next_token_loss   mean cross-entropy of token t+1 given tokens ≤ t (logits are unshifted, [B, L, V])
    kd_loss           T² · KL(teacher ‖ student) on the softened next-token distributions, mean per position
                      (Hinton et al.; the T² keeps gradient magnitudes comparable across temperatures)

Both are computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def next_token_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    t = temperature
    s = F.log_softmax(student_logits[:, :-1].float() / t, -1)
    p = F.log_softmax(teacher_logits[:, :-1].float() / t, -1)
    return F.kl_div(s, p, log_target=True, reduction="none").sum(-1).mean() * (t * t)
