"""Calibration: the windows PTQ sees, and streaming them through a model one decoder layer at a time.

Windows. `quant.calib_samples` windows of `quant.calib_seq_len` tokens, cut from the EOS-joined stream of
calibration documents (`quant.calib_data`, by default the recipe's training data; chat data is rendered with
the chat template first), chosen by a seeded permutation. All windows have the same length and no padding:
CoDA attends to every position, padding included, so padded calibration rows would corrupt the activations of
the real tokens too.

Diffusion-aware calibration (`quant.calib_mask=auto` on the coda family). The diffusion model never sees clean
text at inference: it denoises partially masked sequences. So, as in training, each window is noised: window i
gets mask ratio r = calib_ratios[i mod len] and every token is replaced by <|mask|> with probability r (with
probability `calib_prefix` a window keeps a random clean prefix, CoDA's S1), and the Hessians/AWQ statistics
see the activations the model sees while denoising (DLLMQuant's and Quant-dLLM's masked calibration; a
first tiny-scale measurement found it better than clean calibration at W2). Autoregressive models, and
`calib_mask=none`, get the clean windows.

Streaming (`LayerInputs`). The model runs once up to its first decoder layer, whose inputs (hidden states and
the keyword arguments the decoder passes: rotary embeddings, attention mask) are captured per batch. Then one
layer at a time: `run(layer)` pushes every batch through that layer, and `advance(layer)` replaces the stored
inputs by the layer's outputs, so only one layer's activations exist at once (never all layers' at once).
Calling `advance` after the layer was quantized gives the next layer the inputs it will really see
(sequential PTQ).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from datasets import Dataset
from torch import Tensor, nn

from qat import data, objectives
from qat.config import Recipe


def windows(recipe: Recipe, tokenizer) -> Tensor:
    """[N, calib_seq_len] token ids (N <= calib_samples: fewer when the data is short, at least one)."""
    q = recipe.quant
    cfg = recipe.data
    if q.calib_data:
        cfg = replace(cfg, path=q.calib_data, format="packed", subset="")
    if q.calib_field:
        cfg = replace(cfg, text_field=q.calib_field)
    docs = data.load_documents(cfg)
    if cfg.format == "chat":
        docs = Dataset.from_dict({"text": [
            tokenizer.apply_chat_template([{"role": "user", "content": d["prompt"]},
                                           {"role": "assistant", "content": d["response"]}],
                                          tokenize=False, enable_thinking=False)
            for d in docs
        ]})  # fmt: skip
    rows = data.pack(docs, tokenizer, q.calib_seq_len)
    if len(rows) == 0:
        raise ValueError(f"calibration data gives no window of {q.calib_seq_len} tokens; lower quant.calib_seq_len")
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(recipe.train.seed))[: q.calib_samples]
    return torch.stack([rows[i]["input_ids"] for i in sorted(pick.tolist())])


def noised(ids: Tensor, recipe: Recipe, mask_id: int) -> Tensor:
    """Windows as the diffusion model sees them: ratio calib_ratios[i mod len] for window i (module docstring)."""
    q = recipe.quant
    ratios = torch.tensor(q.calib_ratios, dtype=torch.float32)
    sigma = ratios[torch.arange(len(ids)) % len(ratios)]
    gen = torch.Generator().manual_seed(recipe.train.seed)
    return objectives.diffusion_example(ids, mask_id, prefix_prob=q.calib_prefix, sigma=sigma, generator=gen).inputs


def calibration_ids(recipe: Recipe, tokenizer, model_config) -> Tensor:
    """The calibration windows of this recipe, noised for the diffusion family unless calib_mask=none."""
    ids = windows(recipe, tokenizer)
    if recipe.model.family == "coda" and recipe.quant.calib_mask == "auto":
        ids = noised(ids, recipe, model_config.mask_token_id)
    return ids


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (transformers decoder-only models: `model.model.layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.layers


class _Captured(Exception):
    pass


class LayerInputs:
    """Per-batch inputs of the current decoder layer (module docstring): hidden states [b, L, H] + kwargs."""

    def __init__(self, model: nn.Module, ids: Tensor, batch_size: int):
        self.hidden: list[Tensor] = []
        self.kwargs: list[dict] = []
        first = decoder_layers(model)[0]
        device = next(model.parameters()).device

        def grab(module, args, kwargs):
            self.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            self.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Captured

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in ids.split(batch_size):
                    try:
                        model.get_decoder()(input_ids=batch.to(device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()

    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @torch.no_grad()
    def run(self, layer: nn.Module) -> Iterator[Tensor]:
        """The layer's output for every batch (hooks on its submodules see every batch go by)."""
        for h, kw in zip(self.hidden, self.kwargs, strict=True):
            yield layer(h, **kw)

    def advance(self, layer: nn.Module) -> None:
        """The layer's outputs become the stored inputs (of the next layer)."""
        self.hidden = list(self.run(layer))


def capture(layer: nn.Module, names: list[str], inputs: LayerInputs, on_input) -> None:
    """Run every batch through `layer`, calling on_input(name, x [tokens, in]) with the float input of each named
    submodule (a forward pre-hook: what the linear is about to multiply)."""

    def hook(name: str):
        return lambda module, args: on_input(name, args[0].reshape(-1, args[0].shape[-1]))

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for _ in inputs.run(layer):
            pass
    finally:
        for h in handles:
            h.remove()
