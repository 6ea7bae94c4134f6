"""Weight-only integer matmuls for `QuantizedLinear`, and the choice between them by measurement.

Paths for y = x ŵᵀ (+ b), ŵ = (q − z)·s per group (qat/quant.py):

    int4    PyTorch's CPU tinygemm, `aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)`. Its grid is
            w = (u − 8)·s + m with u ∈ [0, 15] and a float offset m per group, so our codes map exactly:
            symmetric q ∈ [−8, 7] → u = q + 8, m = 0; asymmetric q ∈ [0, 15] with zero point z → u = q,
            m = (8 − z)·s. `sz` = [groups, out, 2] (s, m) in the activation dtype. Needs 4 bits, a CPU tensor,
            out % 16 == 0 and a group size of 32, 64, 128 or 256.
    int8    `torch._weight_int8pack_mm(x, q int8 [out, in], s [out])`: symmetric 8 bits, one scale per row.
    dense   the dequantized weight, built once and cached (every other width and layout: 2 and 3 bits,
            grouped int8, GPU tensors), then `F.linear`; bit for bit what the fake-quant model computes.

Which path is fastest depends on the activation dtype and the number of tokens: measured on this 2-core CPU
(LOG.md, benchmarks/inference.py), in bfloat16 the int4 kernel is 2.3–3× faster than a dense matmul for one
token and 5–11× slower for 64 or more; in float32 it is 10–100× slower than dense at every size. So `choose`
times each candidate (warm-up, then the median of a few calls) the first time a layer shape meets a
(device, dtype, token-count bucket) and remembers the winner for the whole process: every layer of the same
shape reuses the decision. `QuantizedLinear.path` forces one path for a layer, and the environment variable
QAT_KERNELS=dense every layer ("dense" is the exact reference: the tests use it, and so should whoever needs
outputs that do not depend on timings). Decisions are per process: two processes may decide differently for a
shape whose candidates time within noise of each other, and their outputs then differ at the kernels' rounding.

Not covered: the CUDA int4 kernel (`aten._weight_int4pack_mm`, another packing; there was no GPU to verify it
on), activation quantization (W8A8), asymmetric or grouped int8 kernels.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the CPU tinygemm kernel accepts
INT4_TILES = 8  # inner k tiles of its packing
_CHOICES: dict[tuple, str] = {}  # (device, dtype, out, in, bits, group, symmetric, bucket) -> path
TIMING_CALLS = 5  # timed calls per candidate (after one warm-up)


def policy() -> str:
    """"auto" (measure and pick), or the one path every `path="auto"` layer takes (QAT_KERNELS=dense)."""
    return os.environ.get("QAT_KERNELS", "auto")


def paths(bits: int, group_size: int, symmetric: bool, out_features: int, in_features: int,
          device: torch.device) -> list[str]:  # fmt: skip
    """The paths that can compute this layer on `device`, kernels first; "dense" always."""
    out = []
    if device.type == "cpu":
        gs = in_features if group_size == -1 else group_size
        if bits == 4 and out_features % 16 == 0 and gs in INT4_GROUPS and in_features % gs == 0:
            out.append("int4")
        if bits == 8 and symmetric and group_size in (-1, in_features):
            out.append("int8")
    return [*out, "dense"]


def bucket(tokens: int) -> int:
    """Token counts that share a decision: 1, 2, 4, ... (the next power of two), capped at 4096."""
    return min(1 << max(tokens - 1, 0).bit_length(), 4096)


def choose(key: tuple, candidates: dict[str, Callable[[], Tensor]]) -> str:
    """The fastest candidate for `key`, measured the first time `key` is seen and remembered after."""
    if key in _CHOICES:
        return _CHOICES[key]
    if len(candidates) == 1:
        best = next(iter(candidates))
    else:
        times = {}
        for name, fn in candidates.items():
            fn()  # warm-up (and any one-time packing)
            samples = []
            for _ in range(TIMING_CALLS):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
        best = min(times, key=times.get)
    _CHOICES[key] = best
    return best


def decisions() -> dict[tuple, str]:
    """Every decision made so far in this process (for reports and benchmarks)."""
    return dict(_CHOICES)


def forget() -> None:
    """Drop every decision (benchmarks measure afresh; tests start from a known state)."""
    _CHOICES.clear()


# ------------------------------------------------------------------------------------------------------ int4
def int4_pack(codes: Tensor, symmetric: bool) -> Tensor:
    """Signed (symmetric) or unsigned codes [out, in] → the CPU kernel's packed uint8 [out, in / 2]."""
    u = codes.to(torch.int32) + (8 if symmetric else 0)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), INT4_TILES)


def int4_scales_zeros(scale: Tensor, zero: Tensor | None) -> Tensor:
    """(s, m) per group as the kernel wants them, [groups, out, 2] in float32 (cast to the activation dtype
    when used): m = (8 − z)·s for an asymmetric grid, 0 for a symmetric one (module docstring)."""
    s = scale.float()
    m = torch.zeros_like(s) if zero is None else (8 - zero.float()) * s
    return torch.stack([s, m], -1).transpose(0, 1).contiguous()


def int4_mm(x: Tensor, packed: Tensor, group_size: int, sz: Tensor) -> Tensor:
    """x [tokens, in] @ ŵᵀ through the CPU kernel."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, sz)


def int4_unpack(packed: Tensor, out_features: int, in_features: int, symmetric: bool) -> Tensor:
    """Inverse of `int4_pack`: the codes [out, in] (int16).

    The kernel's packing permutes weights in tiles, undocumented and free to change between releases, so the
    permutation is read off the packing function itself: packing matrices whose entries are 4-bit digits of
    each weight's flat index tells, for every nibble of the packed tensor, which weight it holds. (Not cached:
    the index costs 8 bytes per weight, and this runs only when an artifact is saved or inspected.)"""
    index = torch.arange(out_features * in_features, dtype=torch.int64).view(out_features, in_features)
    source = torch.zeros(out_features * in_features, dtype=torch.int64)
    for digit in range(max(1, -(-(out_features * in_features - 1).bit_length() // 4))):
        plane = ((index >> (4 * digit)) & 15).to(torch.int32)
        source |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane, INT4_TILES)) << (4 * digit)
    u = torch.empty(out_features * in_features, dtype=torch.int16)
    u[source] = _nibbles(packed).to(torch.int16)
    return u.view(out_features, in_features) - (8 if symmetric else 0)


def _nibbles(packed: Tensor) -> Tensor:
    """uint8 [..] → its low and high nibbles, interleaved (low first), flat int64."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p & 15, p >> 4], -1).reshape(-1)
