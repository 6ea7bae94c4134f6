"""The modules a model is swapped to: FakeQuantLinear for training, QuantizedLinear for the artifact.

FakeQuantLinear *is* an nn.Linear (PEFT, HF save/load and isinstance checks keep working) that reuses the
original `weight` and `bias` Parameter objects, so optimizers, state_dict keys and tied references are
unchanged by the swap. Its quantizer state lives in a child `weight_quantizer` (keys
`<name>.weight_quantizer.scale` / `.zero_point`), created at swap time and never lazily: an optimizer,
DeepSpeed or FSDP built after `prepare` sees every parameter.

    scales="static"   scale/zero are buffers fixed at init (RTN, optionally MSE-clipped)
    scales="dynamic"  re-derived from the current weight (min/max) at every forward, no state used
    scales="lsq"      scale/zero are Parameters trained with LSQ gradients

QuantizedLinear holds what the artifact stores: packed integer codes (`bits` bits each), float32 scales and
(asymmetric only) float32 zero points holding integers (a learned zero point may leave [qmin, qmax]). Its
forward dequantizes and runs the same `quant.linear` as the fake-quant path, so a converted model computes
exactly what the prepared model computed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qat import kernels, quant
from qat.config import QuantConfig


class WeightQuantizer(nn.Module):
    """Per-group scale (and zero point) for one [out, in] weight."""

    def __init__(self, out_features: int, in_features: int, cfg: QuantConfig, device=None):
        super().__init__()
        self.bits, self.symmetric, self.mode = cfg.bits, cfg.symmetric, cfg.scales
        self.n_groups = quant.group_count(in_features, cfg.group_size)
        self.mse = cfg.mse
        shape = (out_features, self.n_groups)
        scale = torch.ones(shape, device=device)
        zero = None if cfg.symmetric else torch.zeros(shape, device=device)
        if self.mode == "lsq":
            self.scale = nn.Parameter(scale)
            self.zero_point = None if zero is None else nn.Parameter(zero)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero)

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> None:
        """RTN initialisation (MSE-clipped when configured) from the weight."""
        s, z = quant.rtn_qparams(weight, self.bits, self.n_groups, self.symmetric, self.mse)
        self.scale.copy_(s)
        if z is not None:
            self.zero_point.copy_(z)

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.mode == "dynamic":
            return quant.minmax_qparams(weight, self.bits, self.n_groups, self.symmetric)
        if self.mode == "lsq":  # a learned step must stay positive: clamp (identity while it is) on every path
            return self.scale.clamp_min(quant.SCALE_MIN), self.zero_point
        return self.scale, self.zero_point

    @torch.no_grad()
    def codes(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(integer codes [out, in] as float32, scale, integer zero point) for `weight`."""
        s, z = self.qparams(weight)
        z = None if z is None else torch.round(z)
        return quant.quantize(weight, s, z, self.bits, self.symmetric), s.detach(), z

    def forward(self, weight: Tensor) -> Tensor:
        """ŵ by the reference autograd path (used for checks and statistics; training uses the fused op)."""
        s, z = self.qparams(weight)
        return quant.fake_quantize(weight, s, z, self.bits, self.symmetric, lsq=self.mode == "lsq")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.n_groups}, symmetric={self.symmetric}, scales={self.mode}"


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses fake-quantized weights while `enabled` (the float linear otherwise)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        cfg: QuantConfig,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quantizer = WeightQuantizer(out_features, in_features, cfg, device=device)
        self.enabled = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> FakeQuantLinear:
        """Swap target sharing `linear`'s Parameter objects; the quantizer is RTN-initialised from them."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_quantizer = WeightQuantizer(
            linear.out_features, linear.in_features, cfg, device=linear.weight.device
        )
        new.weight_quantizer.init_from(linear.weight)
        new.enabled = True
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """The float nn.Linear again, with the same Parameters (fake quant removed, nothing baked)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return super().forward(x)
        q = self.weight_quantizer
        s, z = q.qparams(self.weight)
        y = quant.fake_quant_linear(x, self.weight, self.bias, s, z, q.bits, q.symmetric)
        offset = getattr(self, "offset", None)  # a QA-LoRA merge's per-group offset (qat/lora.py)
        return y if offset is None else y + quant.linear(x, expand_groups(offset, self.in_features), None)


def expand_groups(per_group: Tensor, in_features: int) -> Tensor:
    """[out, groups] → [out, in]: each group's value repeated over its inputs."""
    return per_group.repeat_interleave(in_features // per_group.shape[1], dim=1)


class QuantizedLinear(nn.Module):
    """A linear stored as packed integer codes + scales, computed by an integer kernel where one applies and is
    measured faster for the input's number of tokens, else by the dequantized weight (qat/kernels.py). `path`:
    "auto" (the cached dense weight as the alternative), "lean" (dequantize per call instead: no dense copy), or
    force "int4", "int8", "dense" or "dequant".

    `qweight` holds the codes in one of three layouts (`held`): "packed" (the artifact's: `bits` per code,
    little-endian), "int4" (the CPU kernel's tiles) or "int8" (signed bytes [out, in]). The first int4/int8 call
    re-lays them out in place, so memory holds one copy of the codes; the state dict is always "packed"."""

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
        bias: bool = False, dtype: torch.dtype = torch.float32, offset: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.dtype = bits, group_size, symmetric, dtype
        n_groups = quant.group_count(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(self._packed_bytes(), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups))
        self.register_buffer("zero_point", None if symmetric else torch.zeros(out_features, n_groups))
        # a float added to every weight of a group (ŵ = (q − z)·s + offset): a QA-LoRA merge (qat/lora.py)
        self.register_buffer("offset", torch.zeros(out_features, n_groups) if offset else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._path = "auto"
        self.held = "packed"
        self._dense: Tensor | None = None  # the dequantized weight, cached by the "dense" path
        self._routes: dict[tuple, str] = {}  # (device, dtype, autocast, tokens) -> path, once decided
        self._kernel_scales: dict[torch.dtype, Tensor] = {}  # per activation dtype
        self.last_path = ""  # the path the last call took (reports)

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path, self._routes = value, {}

    def _packed_bytes(self) -> int:
        return -(-self.in_features * self.out_features // 8) * self.bits

    @classmethod
    def from_fake_quant(cls, m: FakeQuantLinear) -> QuantizedLinear:
        q = m.weight_quantizer
        group_size = m.in_features // q.n_groups
        offset = getattr(m, "offset", None)
        new = cls(m.in_features, m.out_features, q.bits, group_size, q.symmetric, m.bias is not None, m.weight.dtype,
                  offset=offset is not None)  # fmt: skip
        if offset is not None:
            new.offset = offset.detach().float().clone()
        codes, s, z = q.codes(m.weight)
        new.qweight = quant.pack_codes(codes, q.bits, q.symmetric).to(m.weight.device)
        new.scale = s.float().clone()
        if z is not None:
            new.zero_point = z.float().clone()
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        return new

    def codes(self) -> Tensor:
        """Signed integer codes [out, in] (int16), whatever the layout held."""
        shape = (self.out_features, self.in_features)
        if self.held == "int4":
            return kernels.int4_unpack(self.qweight, *shape, self.symmetric)
        if self.held == "int8":
            return self.qweight.to(torch.int16)
        u = quant.unpack(self.qweight, self.bits, self.in_features * self.out_features)
        qmin = quant.int_range(self.bits, self.symmetric)[0]
        return (u.to(torch.int16) + qmin).view(shape)

    def dequantized_weight(self) -> Tensor:
        w = quant.dequantize(self.codes(), self.scale, self.zero_point)
        if self.offset is not None:
            w = w + expand_groups(self.offset, self.in_features)
        return w.to(self.dtype)

    def _hold(self, layout: str) -> None:
        """Re-lay the codes out as `layout` ("packed", "int4" or "int8"), in place."""
        if layout == self.held:
            return
        codes = self.codes()
        if layout == "int4":
            q = kernels.int4_pack(codes, self.symmetric)
        elif layout == "int8":
            q = codes.to(torch.int8)
        else:
            q = quant.pack_codes(codes, self.bits, self.symmetric)
        self.qweight, self.held = q.to(self.qweight.device), layout
        self._kernel_scales = {}

    def _reset(self) -> None:
        """Back to the artifact's layout with no derived tensors (before loading, moving or casting)."""
        self._hold("packed")
        self._dense, self._routes, self._kernel_scales = None, {}, {}

    def _run(self, path: str, x: Tensor) -> Tensor:
        self.last_path = path
        if path == "dense":
            if self._dense is None or self._dense.dtype != self.dtype:
                self._dense = self.dequantized_weight()
            return quant.linear(x, self._dense, self.bias)
        if path == "dequant":
            return quant.linear(x, self.dequantized_weight(), self.bias)
        self._hold(path)
        dt = quant.compute_dtype(x)
        x2 = x.to(dt).reshape(-1, self.in_features)
        if dt not in self._kernel_scales:
            s = (kernels.int4_scales_zeros(self.scale, self.zero_point, self.offset) if path == "int4"
                 else self.scale[:, 0])  # fmt: skip
            self._kernel_scales[dt] = s.to(dt)
        if path == "int4":
            gs = self.in_features if self.group_size == -1 else self.group_size
            y = kernels.int4_mm(x2, self.qweight, gs, self._kernel_scales[dt])
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self._kernel_scales[dt])
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        route = (x.device.type, x.dtype, torch.is_autocast_enabled(x.device.type), x.numel() // self.in_features)
        path = self._routes.get(route)  # this layer's decision for these inputs (the hot path: one dict lookup)
        if path is None:
            path = self._route(x)
            self._routes[route] = path
        return self._run(path, x)

    def _route(self, x: Tensor) -> str:
        mode = self.path if self.path != "auto" else kernels.policy()
        found = kernels.kernel(self.bits, self.group_size, self.symmetric, self.out_features, self.in_features,
                               x.device, offset=self.offset is not None)  # fmt: skip
        if mode not in ("auto", "lean"):
            if mode not in (found, "dense", "dequant"):
                raise ValueError(f"path {mode!r} cannot compute {self.extra_repr()} on {x.device.type}: it can take "
                                 f"{', '.join(p for p in (found, 'dense', 'dequant') if p)}, auto or lean")  # fmt: skip
            return mode
        options = kernels.candidates(found, lean=mode == "lean")
        if len(options) == 1:
            return options[0]
        key = (x.device.type, quant.compute_dtype(x), self.out_features, self.in_features, self.bits,
               self.group_size, self.symmetric, mode, kernels.bucket(x.numel() // self.in_features))  # fmt: skip
        with torch.no_grad():
            path = kernels.choose(key, {p: (lambda p=p: self._run(p, x)) for p in options})
        if path != "dense" and "dense" not in self._routes.values():
            self._dense = None  # built only to be timed
        return path

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.held != "packed":  # the artifact's layout, whatever the kernels hold in memory
            destination[prefix + "qweight"] = quant.pack_codes(self.codes(), self.bits, self.symmetric)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._reset()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._reset()  # kernel layouts are device-specific; derived tensors follow the new dtype/device lazily
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        shape = f"in={self.in_features}, out={self.out_features}"
        return f"{shape}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, path={self.path}"


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast a loaded model's float parameters and buffers to `dtype`, never a QuantizedLinear's codes or scales
    (its compute dtype becomes `dtype`)."""
    for m in model.modules():
        for p in m.parameters(recurse=False):
            p.data = p.data.to(dtype)
        if isinstance(m, QuantizedLinear):
            m.dtype = dtype
        else:
            for name, b in m.named_buffers(recurse=False):
                if b is not None and b.is_floating_point():
                    setattr(m, name, b.to(dtype))
