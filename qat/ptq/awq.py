"""AWQ: activation-aware weight scaling (and clipping) before round-to-nearest quantization.

Idea (Lin et al. 2023, llm-awq). A linear y = W x is unchanged if a positive per-input-channel scale s is
moved from the activation to the weight: y = (W·diag(s)) (x / s). Rounding W·diag(s) instead of W changes
the error of input channel j by roughly 1/s_j relative to the weight (the step of a group is set by its
largest entry, so growing one column only coarsens the others a little), and channel j's contribution to the
output error is weighted by |x_j|. Growing the columns that see large activations therefore protects the
salient weights. The division x / s is never computed at run time: it is folded into whatever produced x.

Scale search, per group of linears that share one input x ∈ R^{N×in} (`Mapping`):

    x̄_j = mean_n |x_nj|                                        (per input channel)
    for r in {0, 1/n_grid, …, (n_grid−1)/n_grid}:
        s = clamp(x̄^r, 1e-4);  s ← s / sqrt(max(s)·min(s))     (centre the scales around 1 in log space)
        Ŵ_i = RTN(W_i·diag(s)) · diag(s)⁻¹                       for every linear i of the group
        loss(r) = mean((inspect(x; Ŵ) − inspect(x; W))²)
    keep the argmin r

RTN is the toolkit's own (quant.minmax_qparams, or quant.mse_qparams when quant.mse), so the searched error is
the error `prepare` will produce. r = 0 gives s ≡ 1, i.e. plain RTN, so the chosen scales never do worse than
RTN under that loss on the calibration data (they can on held-out data). r = 1 is never tried (llm-awq's
grid); llm-compressor's `duo_scaling` (s also divided by a weight statistic) is not implemented.

Folding (`apply_scale`) is exact in real arithmetic: prev's output channel j is divided by s_j (an RMSNorm's
weight, or the output row and bias of a preceding linear) and column j of every linear of the group is
multiplied by s_j. This module never quantizes: it leaves a float model that computes the same function (up to
float rounding and the clipping below) and is easier to round; the caller quantizes it afterwards (prepare).

Clip search (`search_clip`, llm-awq's auto_clip). After scaling, each [row, group] of a weight may be clamped to
±α·max|w| with α ∈ {1, 1 − 1/n_grid, …} (down to 1 − max_shrink, exclusive) chosen per group to minimise the
error of the group's partial dot products Σ_{k∈group} w_k x_k on a token subsample. α = 1 (no clip) is in the
grid, so the per-group error on that sample never increases. Clipping changes the float function, so the
model is only function-preserving up to the clip. q_proj and k_proj are not clipped (llm-awq does the same):
their outputs meet in q·kᵀ followed by softmax (and, in Qwen3, a per-head RMSNorm and RoPE, which mixes pairs of
channels), so the per-output-channel dot-product error is a poor proxy for the attention error; a clip that
looks good per channel can move the attention pattern.

Qwen3 / CoDA decoder layer (`qwen3_mappings`), the four llm-awq groups:

    input_layernorm          → q_proj, k_proj, v_proj   (error of the concatenated q, k, v outputs)
    self_attn.v_proj (rows)  → o_proj                    (only without GQA, see below)
    post_attention_layernorm → gate_proj, up_proj        (error of the MLP output down(silu(gate)·up))
    mlp.up_proj (rows)       → down_proj

v_proj → o_proj: input j of o_proj is attention-output channel j = (head h, dim d), which is a softmax-weighted
sum of channel d of the values of KV head h // n_rep. Dividing v_proj's row j by s_j divides that attention
channel by s_j only when n_rep = 1 (no GQA); with GQA one v channel feeds n_rep o_proj inputs, which would need
equal scales. We test v_proj.out_features == o_proj.in_features (llm-awq tests equal weight shapes, which also
skips the exact case head_dim·heads ≠ hidden). Qwen3-1.7B / CoDA-1.7B (8 KV heads for 16 heads) skip it.
up_proj → down_proj is exact because down's input is silu(gate)·up, linear in up's output.

Not covered: activation quantization (SmoothQuant), duo scaling, MoE and other architectures' mappings,
a loss mask (scoring only some tokens), chunking of the clip or scale search across devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat import quant
from qat.config import QuantConfig

# (x, weights of `linears` in order, float32) → the output whose error is measured
Inspect = Callable[[Tensor, Sequence[Tensor]], Tensor]

NO_CLIP = ("q_proj", "k_proj")  # last name component of linears the clip search skips (see the docstring)


@dataclass
class Mapping:
    """A group of linears sharing one input, and the module whose output channels produce that input.

    `prev` is an RMSNorm-like module (output = weight ⊙ normalised input, `weight` [in]) or an nn.Linear whose
    output is the input (possibly through an elementwise product, as up_proj → down_proj). `inspect(x, ws)`
    computes the output whose error is measured with the weights `ws` in place of the linears' weights (the
    search never writes into a module); None = the concatenated outputs of the linears. `input_of` is the
    name (relative to the layer) of a linear whose captured input is x.
    """

    prev: nn.Module
    linears: list[nn.Linear]
    inspect: Inspect | None = None
    name: str = ""
    input_of: str = ""


@dataclass
class ScaleSearch:
    """The result of a scale search: the scales, the chosen ratio and the loss at it and at r = 0 (plain RTN)."""

    scale: Tensor
    ratio: float
    loss: float
    rtn_loss: float
    losses: list[float] = field(default_factory=list)  # loss per grid ratio, for plots/debugging


def rtn(w: Tensor, cfg: QuantConfig, bits: int | None = None) -> Tensor:
    """Round-to-nearest ŵ (float32) as `prepare` initialises it: per-group min/max (or MSE-clipped) qparams."""
    b = cfg.bits if bits is None else bits
    n_groups = quant.group_count(w.shape[1], cfg.group_size)
    s, z = quant.rtn_qparams(w, b, n_groups, cfg.symmetric, cfg.mse)
    return quant.dequantize(quant.quantize(w, s, z, b, cfg.symmetric), s, z)


def _f32(t: Tensor | None, device: torch.device | None = None) -> Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32)


def _outputs(mapping: Mapping, x: Tensor, weights: Sequence[Tensor]) -> Tensor:
    if mapping.inspect is not None:
        return mapping.inspect(x, weights)
    return torch.cat([F.linear(x, w, _f32(lin.bias)) for w, lin in zip(weights, mapping.linears, strict=True)], -1)


def _check_cfg(cfg: QuantConfig) -> None:
    if not cfg.enabled:
        raise ValueError("AWQ needs a quantized config (quant.bits < 16)")


@torch.no_grad()
def find_scale(
    mapping: Mapping, x: Tensor, quant_cfg: QuantConfig, n_grid: int = 20, chunk_tokens: int = 8192
) -> ScaleSearch:
    """Grid search of the AWQ scale for `mapping` on inputs x [N, in]; see the module docstring.

    Runs in float32 and leaves the modules untouched. The float reference output is kept for all N tokens
    (N × width of inspect's output floats); the forward passes run `chunk_tokens` rows at a time.
    """
    _check_cfg(quant_cfg)
    dev = mapping.linears[0].weight.device
    x = _f32(x, dev).reshape(-1, mapping.linears[0].in_features)
    weights = [_f32(lin.weight) for lin in mapping.linears]
    chunks = x.split(chunk_tokens)
    refs = [_outputs(mapping, c, weights) for c in chunks]
    n_elem = sum(r.numel() for r in refs)
    x_mean = x.abs().mean(0)

    losses: list[float] = []
    best: tuple[float, float, Tensor] | None = None
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.pow(r).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        trial = [rtn(w * s, quant_cfg) / s for w in weights]
        # accumulate in float64: a mean over millions of elements loses digits in float32
        sse = 0.0
        for c, ref in zip(chunks, refs, strict=True):
            sse += float((_outputs(mapping, c, trial) - ref).pow(2).sum(dtype=torch.float64))
        loss = sse / max(n_elem, 1)
        losses.append(loss)
        if best is None or loss < best[0]:  # strict: on ties the smaller ratio (r = 0 = plain RTN first) wins
            best = (loss, r, s)
    assert best is not None, "n_grid must be >= 1"
    return ScaleSearch(scale=best[2], ratio=best[1], loss=best[0], rtn_loss=losses[0], losses=losses)


def search_scale(mapping: Mapping, x: Tensor, quant_cfg: QuantConfig, n_grid: int = 20) -> Tensor:
    """The AWQ scale [in] (float32) for `mapping` on inputs x [N, in]; `find_scale` also returns the losses."""
    return find_scale(mapping, x, quant_cfg, n_grid).scale


@torch.no_grad()
def apply_scale(mapping: Mapping, s: Tensor) -> None:
    """Fold s into the modules in place: prev's output channels / s, the linears' input columns · s.

    Arithmetic is float32, then written back in each parameter's dtype (a bf16 model picks up bf16 rounding).
    """
    s = s.detach().float()
    prev = mapping.prev
    if isinstance(prev, nn.Linear):
        if prev.out_features != s.numel():
            raise ValueError(f"{mapping.name}: prev has {prev.out_features} outputs, the scale {s.numel()}")
        prev.weight.copy_(prev.weight.float().div_(s.to(prev.weight.device).unsqueeze(1)))
        if prev.bias is not None:
            prev.bias.copy_(prev.bias.float().div_(s.to(prev.bias.device)))
    else:
        w = prev.weight
        if w.shape != s.shape:
            raise ValueError(f"{mapping.name}: prev.weight has shape {tuple(w.shape)}, the scale {tuple(s.shape)}")
        w.copy_(w.float().div_(s.to(w.device)))
    for lin in mapping.linears:
        lin.weight.copy_(lin.weight.float().mul_(s.to(lin.weight.device)))


def _partial_dots(wg: Tensor, xg: Tensor) -> Tensor:
    """[rows, G, g] weights, [G, g, T] inputs → [G, rows, T] per-group partial dot products (one bmm)."""
    return torch.bmm(wg.transpose(0, 1), xg)


@torch.no_grad()
def search_clip(
    linear: nn.Linear,
    x: Tensor,
    quant_cfg: QuantConfig,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
    rows_per_chunk: int = 256,
) -> Tensor:
    """Per-[row, group] clamp value max_val [out, n_groups] (float32) minimising the group-partial-dot error.

    Candidates α·max|w| for α = 1 − i/n_grid, i < max_shrink·n_grid; the error of group (o, k) is
    mean_t (Σ_{j∈k} (RTN(clamp(w, ±α·max|w|))_oj − w_oj) x_tj)² over n_tokens evenly spaced tokens of x. Groups are
    quantized independently, so the per-group argmin is exact.
    """
    _check_cfg(quant_cfg)
    w = _f32(linear.weight)
    out, inp = w.shape
    n_groups = quant.group_count(inp, quant_cfg.group_size)
    x = _f32(x, w.device).reshape(-1, inp)
    if x.shape[0] > n_tokens:  # evenly spaced rather than random: deterministic, and spans all sequences
        x = x[torch.linspace(0, x.shape[0] - 1, n_tokens, device=w.device).round().long()]
    xg = x.t().reshape(n_groups, -1, x.shape[0])  # [G, g, T]
    ratios = [1 - i / n_grid for i in range(max(1, math.ceil(max_shrink * n_grid)))]
    best_all = []
    for wc in w.split(rows_per_chunk):  # bounds the [G, rows, T] products
        wg = quant.grouped(wc, n_groups)
        ref = _partial_dots(wg, xg)
        amax = wg.abs().amax(-1, keepdim=True)  # [rows, G, 1]
        best_err, best_val = None, amax
        for a in ratios:
            mv = amax * a
            wq = rtn(torch.clamp(wg, -mv, mv).reshape(wc.shape), quant_cfg)
            err = (_partial_dots(quant.grouped(wq, n_groups), xg) - ref).pow(2).mean(-1).t().unsqueeze(-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err  # strict: α = 1 (no clip) is kept on ties
            best_err = torch.where(better, err, best_err)
            best_val = torch.where(better, mv, best_val)
        best_all.append(best_val.squeeze(-1))
    return torch.cat(best_all)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: Tensor) -> None:
    """Clamp each [row, group] of linear.weight to ±max_val [out, n_groups], in place."""
    w = linear.weight
    wg = quant.grouped(w.detach().float(), max_val.shape[-1])
    mv = max_val.to(device=w.device, dtype=torch.float32).unsqueeze(-1)
    w.copy_(torch.clamp(wg, -mv, mv).reshape(w.shape))


def qwen3_mappings(layer: nn.Module) -> list[Mapping]:
    """The AWQ groups of a transformers Qwen3DecoderLayer (CoDA uses the same module), in the order to apply."""
    attn, mlp = layer.self_attn, layer.mlp

    def mlp_out(x: Tensor, ws: Sequence[Tensor]) -> Tensor:
        # read down_proj at call time: the float MLP with only gate/up replaced, as llm-awq inspects `mlp`
        h = mlp.act_fn(F.linear(x, ws[0], _f32(mlp.gate_proj.bias))) * F.linear(x, ws[1], _f32(mlp.up_proj.bias))
        return F.linear(h, _f32(mlp.down_proj.weight), _f32(mlp.down_proj.bias))

    maps = [Mapping(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], None, "qkv", "self_attn.q_proj")]
    if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA repetition: v channel j ↔ o input j
        maps.append(Mapping(attn.v_proj, [attn.o_proj], None, "o", "self_attn.o_proj"))
    maps.append(
        Mapping(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp_out, "gate_up", "mlp.gate_proj")
    )
    maps.append(Mapping(mlp.up_proj, [mlp.down_proj], None, "down", "mlp.down_proj"))
    return maps


def awq_layer(
    layer: nn.Module,
    inputs: dict[str, Tensor],
    quant_cfg: QuantConfig,
    clip: bool = True,
    n_grid: int = 20,
    mappings: list[Mapping] | None = None,
) -> dict[str, float]:
    """Search and fold AWQ scales (then clips) into one decoder layer, in place; the weights stay float.

    `inputs` holds the float inputs of the layer's linears, keyed by name relative to the layer ("mlp.down_proj"),
    each [N, in] (any leading shape is flattened). The dict and its tensors are not modified: a local copy of
    each input is divided by the scale folded into its linear, so that the clip search sees the inputs the
    scaled weights actually receive (W·s applied to x/s). Mappings default to `qwen3_mappings(layer)`.

    Returns, per mapping NAME: NAME.ratio, NAME.rtn_loss (r = 0), NAME.awq_loss, NAME.gain (1 − awq/rtn, the
    fraction of the RTN loss removed on the calibration data); with clip, clip.LINEAR = mean α over its groups.
    """
    names = {id(m): n for n, m in layer.named_modules()}
    mappings = qwen3_mappings(layer) if mappings is None else mappings
    lin_names = [names[id(lin)] for m in mappings for lin in m.linears]
    needed = {m.input_of for m in mappings} | (set(lin_names) if clip else set())
    missing = sorted(n for n in needed if n not in inputs)
    if missing:
        raise KeyError(f"awq_layer: no captured input for {missing} (have {sorted(inputs)})")
    inputs = dict(inputs)
    stats: dict[str, float] = {}
    for m in mappings:
        res = find_scale(m, inputs[m.input_of], quant_cfg, n_grid)
        apply_scale(m, res.scale)
        stats[f"{m.name}.ratio"] = res.ratio
        stats[f"{m.name}.rtn_loss"] = res.rtn_loss
        stats[f"{m.name}.awq_loss"] = res.loss
        stats[f"{m.name}.gain"] = 1.0 - res.loss / res.rtn_loss if res.rtn_loss > 0 else 0.0
        # Every linear of the group now sees x / s. For a linear prev this is also what a later group would
        # see downstream (down_proj's input silu(gate)·up is divided by s when up's rows are); for a norm prev
        # it only matters to the clip search. q, k, v may share one captured tensor: divide it once.
        divided: dict[int, Tensor] = {}
        for lin in m.linears:
            n = names[id(lin)]
            if n in inputs:
                t = inputs[n]
                if id(t) not in divided:
                    divided[id(t)] = t / res.scale.to(device=t.device, dtype=t.dtype)
                inputs[n] = divided[id(t)]
    if clip:
        for n in dict.fromkeys(lin_names):  # each linear once, in mapping order
            if n.rsplit(".", 1)[-1] in NO_CLIP:
                continue
            lin = layer.get_submodule(n)
            max_val = search_clip(lin, inputs[n], quant_cfg)
            amax = quant.grouped(lin.weight.detach().float(), max_val.shape[-1]).abs().amax(-1)
            stats[f"clip.{n}"] = float((max_val / amax.clamp_min(torch.finfo(torch.float32).tiny)).mean())
            apply_clip(lin, max_val)
    return stats
