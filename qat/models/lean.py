"""A lean forward of the Qwen3 network (Qwen3, CoDA) for diffusion sampling: only the work a step reads.

A denoising step reads the logits of the masked positions, right-shifted (hidden state j − 1 predicts token j).
`model(x).logits` computes much more than that; per step, for a sequence of L positions:

    work                                     transformers' forward        here
    rotary cos/sin of positions 0..L−1        recomputed                    once per generation (`rope`)
    attention mask                            built (a 4D one with padding) none without padding; [B,1,1,K] with
    last layer: queries, attention output,    all L rows                    only the rows some masked token
      o_proj, MLP                                                           reads (`rows`)
    final norm, LM head                       all L rows: [B, L, V]          those rows only (`head`)
    right shift of the logits                 a copy of [B, L, V]            an index shift

Every layer but the last runs the same modules and functions as transformers' forward, in the same order, so
its output is bitwise the same (tested). The last layer and the head run on fewer rows, and a matmul over fewer
rows may round differently in the last bit (CPU BLAS and GPU libraries pick kernels by shape): exact in real
arithmetic, the same algorithm, but not bitwise. Linear layers are called as modules, so fake-quant
(FakeQuantLinear) and integer (QuantizedLinear) models run unchanged.

Cached decoding builds on `forward`: with `keep_kv=True` it returns every layer's keys and values (after the
k-norm and rotary embedding, i.e. exactly what attention reads), and `context` lets a forward over a window of
positions attend to keys and values computed earlier for other positions. Attention here is bidirectional and
unmasked (CoDA), so the order of the keys does not matter, only that each key carries its own position's rotary
phase; `context_mask` hides padding among the context keys.

Not covered: causal (autoregressive) attention, sliding-window layers, attention other than SDPA (flash-attention
and eager models run through SDPA here: the same math), models whose logits are not `lm_head(norm(h))`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb, repeat_kv


@dataclass
class KV:
    """Keys and values per layer, [B, kv_heads, n, head_dim] each, for n positions."""

    k: list[Tensor]
    v: list[Tensor]

    def select(self, index: Tensor) -> KV:
        """The positions `index` (along the sequence) of every layer."""
        return KV([k.index_select(2, index) for k in self.k], [v.index_select(2, index) for v in self.v])


class LeanDecoder:
    """The lean forward of a Qwen3-architecture model (module docstring). Raises TypeError for other models."""

    def __init__(self, model: nn.Module, pack: bool = True):
        base = getattr(model, "get_decoder", lambda: None)()
        self.head = getattr(model, "get_output_embeddings", lambda: None)()
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or self.head is None or not all(hasattr(base, p) for p in parts):
            raise TypeError(f"{type(model).__name__}: not a Qwen3-architecture model (decoder layers, norm, head)")
        if any(getattr(layer, "attention_type", "full_attention") != "full_attention" for layer in base.layers):
            raise TypeError("sliding-window attention layers are not supported by the lean forward")
        self.embed, self.layers, self.norm, self.rotary = base.embed_tokens, base.layers, base.norm, base.rotary_emb
        self.head_dim = self.layers[0].self_attn.head_dim
        self.pack = pack and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
        # ids of sibling linears -> (MKL-packed concatenated weight, that weight, bias, rows it was packed for)
        self._packs: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor | None, int]] = {}
        self._seen: dict[tuple[tuple[int, ...], int], int] = {}  # (ids, rows) -> calls

    def linears(self, modules: tuple[nn.Module, ...], x: Tensor) -> list[Tensor]:
        """[m(x) for m in modules]: sibling projections of one input (q/k/v, gate/up). Float32 nn.Linears on CPU go
        through MKL's sgemm as ONE matmul on their weights concatenated and packed once: a plain call re-packs its
        weight every time (20-30 % at these shapes) and three small matmuls use the cores worse than one wide one
        (LOG.md). Concatenating output columns leaves every dot product's reduction as it was (bitwise the same,
        tested). A pack serves one number of rows (other counts take the plain path), so it is made for the first
        row count met a third time: the full sequence in exact decoding, the window in cached decoding, never the
        ever-shrinking rows of the last layer and the head. Costs a second copy of those weights for the
        decoder's lifetime (one generation). Fake-quant, integer, bf16 and GPU linears are called as they are."""
        rows, key = x.numel() // x.shape[-1], tuple(id(m) for m in modules)
        if not (self.pack and all(_plain(m) for m in modules)) or (key not in self._packs and self._count(key, rows)):
            return [m(x) for m in modules]
        if key not in self._packs:
            w = modules[0].weight if len(modules) == 1 else torch.cat([m.weight for m in modules])
            bias = [m.bias for m in modules]
            b = None if all(t is None for t in bias) else torch.cat([_bias(m) for m in modules])
            # MKL reads only the packed copy when the row count matches (the only way it is called here); the
            # unpacked argument is a zero-stride stand-in of the right shape, not a third copy of the weights
            stand_in = w.new_zeros(1).expand(w.shape)
            self._packs[key] = (torch.ops.mkl._mkl_reorder_linear_weight(w, rows), stand_in, b, rows)
        packed, w, b, batch = self._packs[key]
        if rows != batch:
            return [m(x) for m in modules]
        y = torch.ops.mkl._mkl_linear(x.reshape(rows, -1), packed, w, b, batch).view(*x.shape[:-1], -1)
        return list(y.split([m.out_features for m in modules], -1)) if len(modules) > 1 else [y]

    def _count(self, key: tuple[int, ...], rows: int) -> bool:
        """Count a call of `key` with `rows` rows; True while it is still below the third (not packed yet)."""
        self._seen[key, rows] = self._seen.get((key, rows), 0) + 1
        return self._seen[key, rows] < 3

    def head_logits(self, hidden: Tensor) -> Tensor:
        """The LM head on (normed) hidden states [..., H]."""
        return self.head(hidden)  # its rows shrink step by step: packing would not pay

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) [B or 1, n, head_dim] for integer positions [B or 1, n]: transformers' own computation."""
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        return self.rotary(probe, positions)

    def sequence_rope(self, length: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`rope` of a whole sequence in the model's dtype: `positions` [B, L] (left padding), else 0..L−1."""
        device = self.embed.weight.device
        positions = torch.arange(length, device=device)[None] if positions is None else positions
        return self.rope(positions, self.embed.weight.dtype)

    def read_logits(self, ids: Tensor, rope: tuple[Tensor, Tensor], b: Tensor, j: Tensor, start: int = 0,
                    **kw) -> tuple[Tensor, KV | None]:  # fmt: skip
        """(logits [len(j), V] of positions (b, j), this window's K/V if kw asks): the window `ids` begins at
        sequence position `start`; hidden state j − 1 predicts token j (position 0 reads its own), so the last
        layer runs only on the rows some (b, j) reads, in any batch row. kw: `forward`'s."""
        read, where = torch.unique((j - 1 - start).clamp_min(0), return_inverse=True)
        hidden, kv = self.forward(ids, rope, rows=read, **kw)
        return self.head_logits(hidden[b, where]), kv

    def forward(self, ids: Tensor, rope: tuple[Tensor, Tensor], *, rows: Tensor | None = None,
                context: KV | None = None, context_mask: Tensor | None = None, key_mask: Tensor | None = None,
                keep_kv: bool = False) -> tuple[Tensor, KV | None]:  # fmt: skip
        """(normed last hidden states [B, len(rows) or n, H], this window's K/V if keep_kv) for token ids [B, n].

        rope: `rope(positions)` of these n positions. rows: the positions (indices into n) whose outputs are read;
        only the last layer and the norm are restricted to them. context: K/V of other positions to attend to as
        well, with context_mask [B, m] (True = attend; None = all); key_mask [B, n] hides some of these n
        positions as keys (left padding)."""
        h = self.embed(ids)
        cos, sin = rope
        mask = None
        if key_mask is not None or context_mask is not None:
            B, n, m = ids.shape[0], ids.shape[1], 0 if context is None else context.k[0].shape[2]
            mine = torch.ones(B, n, dtype=torch.bool, device=ids.device) if key_mask is None else key_mask.bool()
            theirs = torch.ones(B, m, dtype=torch.bool, device=ids.device) if context_mask is None else context_mask
            mask = torch.cat([theirs.bool(), mine], 1)[:, None, None, :]
        kept = KV([], []) if keep_kv else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, k, v = self._layer(layer, h, cos, sin, context, i, mask, rows if i == last else None)
            if kept is not None:
                kept.k.append(k)
                kept.v.append(v)
        return self.norm(h), kept

    def _layer(self, layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, context: KV | None, i: int,
               mask: Tensor | None, rows: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """One decoder layer as transformers computes it (Qwen3DecoderLayer, Qwen3Attention, sdpa_attention_forward),
        with queries and everything after attention restricted to `rows` when given."""
        attn, mlp = layer.self_attn, layer.mlp
        B, n, _ = h.shape
        x = _rms(layer.input_layernorm, h)
        shape = (B, n, -1, self.head_dim)
        q, k, v = self.linears((attn.q_proj, attn.k_proj, attn.v_proj), x)
        q = _rms(attn.q_norm, q.view(shape)).transpose(1, 2)
        k = _rms(attn.k_norm, k.view(shape)).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = k, v
        if context is not None:
            keys, values = torch.cat([context.k[i], k], 2), torch.cat([context.v[i], v], 2)
        if rows is not None:
            q, h = q[:, :, rows], h[:, rows]
        groups = attn.num_key_value_groups
        if mask is None and groups > 1:
            out = F.scaled_dot_product_attention(q, keys, values, scale=attn.scaling, enable_gqa=True)
        else:
            if groups > 1:
                keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
        h = h + self.linears((attn.o_proj,), out.transpose(1, 2).reshape(B, q.shape[2], -1))[0]
        x = _rms(layer.post_attention_layernorm, h)
        if type(mlp).__name__ == "Qwen3MLP":  # the same arithmetic with fewer temporaries
            gate, up = self.linears((mlp.gate_proj, mlp.up_proj), x)
            return h.add_(self.linears((mlp.down_proj,), mlp.act_fn(gate).mul_(up))[0]), k, v
        return h.add_(mlp(x)), k, v


def _plain(module: nn.Module) -> bool:
    """A float32 torch.nn.Linear on CPU (not a subclass: fake-quant and integer linears compute otherwise)."""
    w = getattr(module, "weight", None)
    return type(module) is nn.Linear and w.dtype == torch.float32 and w.device.type == "cpu"


def _bias(module: nn.Linear) -> Tensor:
    return module.bias if module.bias is not None else module.weight.new_zeros(module.out_features)


def _rms(norm: nn.Module, x: Tensor) -> Tensor:
    """Qwen3RMSNorm(x) through torch's fused kernel: w · (x / sqrt(mean(x²) + eps)) in float32, cast back before
    the weight as transformers does (bitwise the same in float32, tested); any other norm module is called."""
    if type(norm).__name__ != "Qwen3RMSNorm":
        return norm(x)
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype)
