"""LoRA-QAT: low-rank adapters on the fake-quantized linears, through PEFT, merged and re-quantized at the end.

    y = Q(W) x + (α/r) B A x          W frozen (the PTQ solution's latent weights), A, B trained (B = 0 at start)

Only A and B train (and, with `train.lora.scales`, the learned quantizer scales and zero points), so optimizer
state and gradients cost a few percent of full QAT's; the frozen base keeps its fake quantization, so the
adapters learn to correct the quantized model, with the family's own loss and distillation. FakeQuantLinear is an
nn.Linear, so PEFT's own LoRA layer wraps it unchanged (`peft.get_peft_model`).

Merge. Training computed (Q(W) + (α/r) B A) x, so that is the weight merged: each base weight is first replaced
by its quantized value Q(W), then the adapter is added (PEFT's `merge_and_unload`), and the sum is quantized on
the grid training ended with (the PTQ scales, or the learned ones). A code changes only where the adapter moved
the weight by more than half a step. (Merging into the latent W instead would flip codes wherever W sits near a
rounding boundary, as GPTQ's pre-rounding latents do: a first version did that and ended worse than GPTQ.) This
is plain re-quantization: the artifact computes Q(Q(W) + BA), and the trainer reports its validation loss next
to the pre-merge one. QA-LoRA's group-wise variant (adapters on group-pooled inputs, so that BA is constant within each
quantization group and folds exactly into the zero points) would keep the merged model exactly on the grid for
asymmetric grids; it is not implemented here.

The distillation teacher under LoRA: with `train.kd_teacher=self` it is the same model with its adapters disabled
and fake quantization off, i.e. exactly the frozen float base.
"""

from __future__ import annotations

from torch import nn

from qat.config import LoraConfig, RecipeError


def wrap(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """The PEFT model with adapters on `cfg.targets` (the base frozen; scales trainable if cfg.scales)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.targets if t not in found]
    if missing:
        raise RecipeError(f"train.lora.targets: no linear named {missing} in the model (it has {sorted(found)})")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                              bias="none")  # fmt: skip
    model = get_peft_model(model, peft_cfg)
    if cfg.scales:
        for name, p in model.named_parameters():
            if "weight_quantizer" in name:
                p.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    """The base model with every adapter folded into its quantized weight, Q(W) + BA (module docstring);
    quantizers unchanged, so converting it re-quantizes that sum on the trained grid."""
    import torch

    from qat.modules import FakeQuantLinear

    with torch.no_grad():
        for m in model.modules():
            base = getattr(m, "base_layer", None)
            if isinstance(base, FakeQuantLinear) and getattr(m, "lora_A", None):
                base.weight.copy_(base.weight_quantizer(base.weight))
    return model.merge_and_unload()


def is_wrapped(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
