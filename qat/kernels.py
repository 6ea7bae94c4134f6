"""Weight-only integer matmuls for `QuantizedLinear`, and the choice between them by measurement.

Paths for y = x ŵᵀ (+ b), ŵ = (q − z)·s per group (qat/quant.py):

    int4    PyTorch's CPU tinygemm, `aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)`. Its grid is
            w = (u − 8)·s + m with u ∈ [0, 15] and a float offset m per group, so our codes map exactly:
            symmetric q ∈ [−8, 7] → u = q + 8, m = 0; asymmetric q ∈ [0, 15] with zero point z → u = q,
            m = (8 − z)·s. `sz` = [groups, out, 2] (s, m) in the activation dtype. Needs 4 bits, a CPU tensor,
            out % 16 == 0 and a group size of 32, 64, 128 or 256.
    int8    `torch._weight_int8pack_mm(x, q int8 [out, in], s [out])`: symmetric 8 bits, one scale per row.
    dequant the weight dequantized for this call only, then `F.linear`: the alternative to a kernel where one
            applies (many tokens at once), so that memory keeps one 4- or 8-bit copy of the weights
    dense   the dequantized weight, built once and cached (every other width and layout: 2 and 3 bits,
            grouped int8, GPU tensors), then `F.linear`; bit for bit what the fake-quant model computes (and so
            is "dequant").

Which path is fastest depends on the activation dtype and the number of tokens: measured on this 2-core CPU
(LOG.md, benchmarks/inference.py), in bfloat16 the int4 kernel is 2.3–3× faster than a dense matmul for one
token and 5–11× slower for 64 or more; in float32 it is 10–100× slower than dense at every size. So by default
a layer with a kernel uses it for few tokens and its cached dense weight for many (a prompt's prefill, every
diffusion step), holding both copies once both ran; the "lean" policy never keeps a dense copy and dequantizes
per call instead (the memory of the codes alone, at a price for many tokens). `choose` times the candidates
(qat/latency.py's interleaved rounds: a warm-up, then the median of a few calls each) the first time a layer
shape meets a (device, dtype, token-count bucket) and remembers the winner for the whole process: every layer of
the same shape reuses the decision. `QuantizedLinear.path` sets a layer's policy or forces one path, the environment
variable QAT_KERNELS every layer's (`policy`; "dense" is the exact reference: the tests use it, and so should
whoever needs outputs that do not depend on timings). Decisions are per process: two processes may decide
differently for a shape whose candidates time within noise of each other, and their outputs then differ at the
kernels' rounding.

Not covered: the CUDA int4 kernel (`aten._weight_int4pack_mm`, another packing; there was no GPU to verify it
on), activation quantization (W8A8), asymmetric or grouped int8 kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the CPU tinygemm kernel accepts
INT4_TILES = 8  # inner k tiles of its packing
_CHOICES: dict[tuple, str] = {}  # (device, dtype, out, in, bits, group, symmetric, bucket) -> path
TIMING_CALLS = 5  # timed calls per candidate (after one warm-up)


def policy() -> str:
    """What `path="auto"` layers do: "auto" (measure the kernel against the cached dense weight), "lean"
    (measure the kernel against dequantizing per call: no dense copy, ever), or one path for every layer
    ("dense", the exact reference). From the environment variable QAT_KERNELS; "auto" when unset."""
    return os.environ.get("QAT_KERNELS", "auto")


def kernel(bits: int, group_size: int, symmetric: bool, out_features: int, in_features: int,
           device: torch.device, offset: bool = False) -> str | None:  # fmt: skip
    """The integer kernel that can compute this layer on `device`, if any ("int4", "int8" or None). `offset`: the
    layer adds a float offset per group (a QA-LoRA merge), which tinygemm's grid holds and the int8 kernel not."""
    if device.type != "cpu":
        return None
    gs = in_features if group_size == -1 else group_size
    if bits == 4 and out_features % 16 == 0 and gs in INT4_GROUPS and in_features % gs == 0:
        return "int4"
    if bits == 8 and symmetric and group_size in (-1, in_features) and not offset:
        return "int8"
    return None


def candidates(kernel_path: str | None, lean: bool) -> list[str]:
    """The paths `choose` measures: the kernel, if any, and the dequantized weight (cached, or per call when
    lean)."""
    return [p for p in (kernel_path, "dequant" if lean else "dense") if p]


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
        from qat.latency import interleaved  # (qat.latency imports the modules that import this file)

        times = interleaved(candidates, rounds=TIMING_CALLS)  # the warm-up also does any one-time packing
        best = min(times, key=lambda name: times[name].median_ms)
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


def int4_scales_zeros(scale: Tensor, zero: Tensor | None, offset: Tensor | None = None) -> Tensor:
    """(s, m) per group as the kernel wants them, [groups, out, 2] in float32 (cast to the activation dtype
    when used): m = (8 − z)·s for an asymmetric grid, 0 for a symmetric one (module docstring), plus any float
    offset per group."""
    s = scale.float()
    m = torch.zeros_like(s) if zero is None else (8 - zero.float()) * s
    if offset is not None:
        m = m + offset.float()
    return torch.stack([s, m], -1).transpose(0, 1).contiguous()


def int4_mm(x: Tensor, packed: Tensor, group_size: int, sz: Tensor) -> Tensor:
    """x [tokens, in] @ ŵᵀ through the CPU kernel."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, sz)


def int4_unpack(packed: Tensor, out_features: int, in_features: int, symmetric: bool) -> Tensor:
    """Inverse of `int4_pack`: the codes [out, in] (int16).

    The kernel packs rows in blocks (64 or 32 rows, by the CPU's vector width, then a smaller tail): a block's
    bytes run over the inputs k, each k holding the block's rows as nibble pairs in an order of its own
    (PyTorch's int4mm_kernel.cpp). That order is read off the packing function itself, on a two-column probe
    (`_int4_blocks`), so a different ISA or release cannot silently scramble the codes; unpacking is then a few
    views and one gather per block shape."""
    nib = _nibbles(packed)
    out = torch.empty(out_features, in_features, dtype=torch.int16)
    pos = 0
    for row, count, size, order in _int4_blocks(out_features):  # runs of `count` blocks of `size` rows alike
        n = count * size * in_features
        block = nib[pos : pos + n].view(count, in_features, size)[:, :, order]  # [blocks, k, rows in order]
        out[row : row + count * size] = block.transpose(1, 2).reshape(count * size, in_features)
        pos += n
    return out - (8 if symmetric else 0)


_BLOCKS: dict[int, list[tuple[int, int, int, Tensor]]] = {}


def _int4_blocks(out_features: int) -> list[tuple[int, int, int, Tensor]]:
    """[(first row, blocks, rows per block, inverse row order)] of the CPU packing for `out_features` rows."""
    if out_features in _BLOCKS:
        return _BLOCKS[out_features]
    rows = torch.arange(out_features, dtype=torch.int64).unsqueeze(1).expand(out_features, 2)
    seen = torch.zeros(2 * out_features, dtype=torch.int64)
    for digit in range(max(1, -(-(out_features - 1).bit_length() // 4))):  # 4-bit digits of each row index
        plane = ((rows >> (4 * digit)) & 15).to(torch.int32).contiguous()
        seen |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane, INT4_TILES)).long() << (4 * digit)
    runs: list[tuple[int, int, int, Tensor]] = []
    pos = row = 0
    while row < out_features:
        k0 = seen[pos:]
        size = next((j for j in range(1, len(k0)) if k0[j] == k0[0]), len(k0) // 2)  # k = 1 starts the repeat
        first = k0[:size] - row
        if sorted(first.tolist()) != list(range(size)) or not torch.equal(k0[size : 2 * size] - row, first):
            raise RuntimeError("unexpected int4 packing layout of this PyTorch build; cannot unpack it")
        inverse = torch.argsort(first)
        if runs and runs[-1][2] == size and torch.equal(runs[-1][3], inverse):
            start, count = runs[-1][0], runs[-1][1] + 1
            runs[-1] = (start, count, size, inverse)
        else:
            runs.append((row, 1, size, inverse))
        pos, row = pos + 2 * size, row + size
    _BLOCKS[out_features] = runs
    return runs


def _nibbles(packed: Tensor) -> Tensor:
    """uint8 [..] → its low and high nibbles, interleaved (low first), flat uint8."""
    p = packed.reshape(-1)
    return torch.stack([p & 15, p >> 4], -1).reshape(-1)
