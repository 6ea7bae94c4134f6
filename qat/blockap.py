"""Block-wise reconstruction before end-to-end QAT (EfficientQAT's Block-AP), `train.block_ap_steps`.

Why. End-to-end QAT spends every step on a forward and backward of the whole network plus the teacher, and at 2
bits its first hundreds of steps mostly repair what rounding broke layer by layer. Reconstructing one decoder
layer at a time does that repair far more cheaply: no lm_head, no teacher forward beyond one layer, and a dense
target (every hidden unit of every token) instead of a next-token distribution.

What. With the fake-quant model (student, already holding its PTQ solution) and the float model (teacher), the
calibration windows (qat/ptq/calibrate.py; noised for the diffusion family) are streamed through both, one decoder
layer at a time. For layer i, with x_q the student's inputs (what the quantized layers before it produce) and x_f
the teacher's (the float model's own):

    minimise over layer i's parameters   mean ‖ f_q,i(x_q) − f_i(x_f) ‖²

(latent weights through the straight-through estimator, learned scales and zero points, norms), AdamW with a
cosine decay, `train.block_ap_steps` steps of `quant.calib_batch` windows, scales at `train.scales_lr_ratio`.
The target is the float layer on the *float* inputs, so layer i also learns to undo the error of layers < i
(EfficientQAT; BRECQ-style targets on the quantized inputs would not). Then x_q ← f_q,i(x_q), x_f ← f_i(x_f).

Not covered: linears outside the decoder layers (an unskipped lm_head keeps its PTQ solution until end-to-end
training), and sharded models (the caller gathers the weights, as for PTQ).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat.ptq.calibrate import LayerInputs, decoder_layers


@dataclass
class BlockReport:
    layer: int
    before: float  # mean squared error against the float layer's outputs, before reconstruction
    after: float  # and after


def _mse(outputs: list[Tensor], targets: list[Tensor]) -> float:
    num = sum(float((o.float() - t.float()).pow(2).sum()) for o, t in zip(outputs, targets, strict=True))
    return num / sum(t.numel() for t in targets)


def reconstruct(student: nn.Module, teacher: nn.Module, ids: Tensor, steps: int, lr: float, batch_size: int,
                groups: Callable[[nn.Module], list[dict]], seed: int = 0, grad_clip: float = 1.0,
                min_lr_ratio: float = 0.1, progress: bool = True) -> list[BlockReport]:  # fmt: skip
    """Reconstruct every decoder layer of `student` against `teacher` (module docstring); in place. `groups(layer)`
    gives the optimizer's parameter groups of a layer (an "lr_ratio" key scales a group's learning rate)."""
    q_in, f_in = LayerInputs(student, ids, batch_size), LayerInputs(teacher, ids, batch_size)
    reports = []
    layers = list(zip(decoder_layers(student), decoder_layers(teacher), strict=True))
    for i, (layer, reference) in enumerate(tqdm(layers, desc="block-ap", disable=not progress)):
        targets = list(f_in.run(reference))
        before = _mse(list(q_in.run(layer)), targets)
        param_groups = [g for g in groups(layer) if g["params"]]
        for g in param_groups:
            g["lr_ratio"] = g.get("lr_ratio", 1.0)
        opt = torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95))
        params = [p for g in param_groups for p in g["params"]]
        order = torch.randperm(len(q_in.hidden), generator=torch.Generator().manual_seed(seed + i))
        layer.train()
        for step in range(steps):
            scale = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
            for g in opt.param_groups:
                g["lr"] = lr * scale * g["lr_ratio"]
            j = int(order[step % len(order)])
            out = layer(q_in.hidden[j], **q_in.kwargs[j])
            loss = torch.nn.functional.mse_loss(out.float(), targets[j].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        outputs = list(q_in.run(layer))
        reports.append(BlockReport(i, before, _mse(outputs, targets)))
        q_in.hidden, f_in.hidden = outputs, targets
    return reports
