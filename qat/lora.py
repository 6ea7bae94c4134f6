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
to the pre-merge one. At 2 bits the adapter's deltas all stay under half a step, and the merge keeps nothing of
what it learned (LOG.md): the group merge below does not have that problem.

Group merge (`train.lora.merge=group`, QA-LoRA): the adapter reads the input averaged over each quantization
group, y = Q(W) x + (α/r) B A pool_g(x) with A [r, in/g], so its weight delta (α/r)·(BA)[o, k // g] / g is one
number per (row, group) and folds exactly into a float offset per group: ŵ = (q − z)·s + c. The codes do not
change and the artifact computes what training computed (tested to float rounding); the int4 kernel's grid holds
such an offset, the export formats do not (they refuse it). Fewer adapter inputs (in/g) make it a weaker adapter
than plain LoRA of the same rank.

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
    if cfg.merge == "group":
        from qat.modules import FakeQuantLinear

        peft_cfg._register_custom_module({FakeQuantLinear: _group_lora()})
    model = get_peft_model(model, peft_cfg)
    if cfg.scales:
        for name, p in model.named_parameters():
            if "weight_quantizer" in name:
                p.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    """The base model with every adapter folded in (module docstring): group adapters into a per-group offset of
    their FakeQuantLinear; plain ones into its quantized weight, Q(W) + BA, re-quantized on the trained grid when
    the model is converted."""
    import torch

    from qat.modules import FakeQuantLinear

    group_cls = _group_lora()
    with torch.no_grad():
        grouped = [m for m in model.modules() if isinstance(m, group_cls)]
        for m in grouped:
            base = m.get_base_layer()
            delta = sum(m.lora_B[n].weight @ m.lora_A[n].weight * m.scaling[n] / m.group for n in m.lora_A)
            offset = getattr(base, "offset", None)
            base.register_buffer("offset", delta.float() if offset is None else offset + delta.float())
        if grouped:
            return model.unload()  # the adapters are in the offsets now
    with torch.no_grad():
        for m in model.modules():
            base = getattr(m, "base_layer", None)
            if isinstance(base, FakeQuantLinear) and getattr(m, "lora_A", None):
                base.weight.copy_(base.weight_quantizer(base.weight))
    return model.merge_and_unload()


def is_wrapped(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


_GROUP_LORA: list[type] = []


def _group_lora() -> type:
    """The QA-LoRA layer class (built on first use: PEFT is imported lazily)."""
    if _GROUP_LORA:
        return _GROUP_LORA[0]
    import torch
    from peft.tuners.lora.layer import LoraLayer

    class GroupLora(nn.Module, LoraLayer):
        """LoRA whose A reads the input averaged over each quantization group of the base FakeQuantLinear."""

        adapter_layer_names = ("lora_A", "lora_B")

        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer, **kwargs)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            base = self.get_base_layer()
            self.group = base.in_features // base.weight_quantizer.n_groups
            a = nn.Linear(base.in_features // self.group, r, bias=False, device=base.weight.device)
            nn.init.kaiming_uniform_(a.weight, a=5**0.5)  # as PEFT initialises A (B stays zero)
            self.lora_A[adapter_name] = a

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return out
            for name in self.active_adapters:
                if name in self.lora_A:
                    pooled = self.lora_dropout[name](x).unflatten(-1, (-1, self.group)).mean(-1)
                    a, b = self.lora_A[name], self.lora_B[name]
                    out = out + b(a(pooled.to(a.weight.dtype))).to(out.dtype) * self.scaling[name]
            return out

    _GROUP_LORA.append(GroupLora)
    return GroupLora
