"""Held-out loss of a checkpoint on Python code: the metric for models too small to solve HumanEval/MBPP.

    python -m eval.heldout checkpoint=DIR data=PATH [seq_len=256] [max_docs=0] [max_rows=64] [batch_size=8]
                           [ratios=[0.1,0.3,0.5,0.7,0.9]] [seed=0] [out=FILE.json]

Data: any `data.path` the trainer accepts (a directory of source files, a jsonl/parquet file, `stdlib`), packed
into windows of `seq_len` tokens exactly as for training; the first `max_rows` windows are scored (deterministic).

    AR (qwen3)        mean next-token negative log-likelihood over every target token
    diffusion (coda)  masked-token NLL: for each mask ratio r of a fixed grid, every window is noised with ratio
                      r (a fixed seed, so every checkpoint sees the same masks), and the NLL of the masked tokens
                      is averaged; the loss is the mean over the grid. (Not the 1/r-weighted ELBO: a plain NLL per
                      masked token, comparable across checkpoints of one family, not across families.)

The last line of stdout is a JSON object with at least `loss` and `tokens` (tokens scored), also written to `out`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from qat import data, objectives  # noqa: E402
from qat.config import DataConfig, RecipeError, exit_on_error, parse_cli  # noqa: E402


@dataclass
class HeldoutConfig:
    checkpoint: str = "???"
    data: str = "stdlib"
    glob: str = "*.py"
    text_field: str = "content"
    seq_len: int = 256
    max_docs: int = 0
    max_rows: int = 64
    batch_size: int = 8
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = 0
    out: str = ""


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, family: str, ratios: list[float], seed: int = 0, batch_size: int = 8
                 ) -> dict[str, float]:  # fmt: skip
    """{"loss", "tokens", and per-ratio losses for diffusion} of `model` on windows `ids` [N, L]."""
    device = next(model.parameters()).device
    total, count, per_ratio = 0.0, 0, {}
    grid = ratios if family == "coda" else [None]
    for r in grid:
        r_total, r_count = 0.0, 0
        gen = torch.Generator(device=device).manual_seed(seed)
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            if r is None:
                ex = objectives.causal_example(batch)
            else:
                sigma = torch.full((len(batch),), r)
                ex = objectives.diffusion_example(batch, model.config.mask_token_id, sigma=sigma, generator=gen)
            sel = ex.weight > 0
            logits = model(input_ids=ex.inputs).logits[:, :-1][sel].float()
            r_total += float(F.cross_entropy(logits, ex.targets[sel], reduction="sum"))
            r_count += int(sel.sum())
        if r is not None:
            per_ratio[f"loss@{r:g}"] = r_total / max(r_count, 1)
        total, count = total + r_total / max(r_count, 1), count + r_count
    loss = total / len(grid)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, **per_ratio}


def main(argv: list[str] | None = None) -> dict:
    from qat.models import family_of, load

    with exit_on_error(FileNotFoundError, OSError):
        cfg = parse_cli(HeldoutConfig, sys.argv[1:] if argv is None else argv)
        if cfg.checkpoint == "???":
            raise RecipeError("checkpoint=DIR is required")
        if not Path(cfg.checkpoint).is_dir():
            raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such directory")
        family = family_of(cfg.checkpoint)
        model, tok = load(cfg.checkpoint)
        dcfg = DataConfig(path=cfg.data, glob=cfg.glob, text_field=cfg.text_field, max_docs=cfg.max_docs)
        rows = data.pack(data.load_documents(dcfg), tok, cfg.seq_len)
        if len(rows) == 0:
            raise RecipeError(f"data={cfg.data} gives no window of {cfg.seq_len} tokens")
    ids = torch.stack([rows[i]["input_ids"] for i in range(min(cfg.max_rows, len(rows)))])
    result = {"checkpoint": cfg.checkpoint, "family": family, "data": cfg.data, "windows": len(ids),
              "seq_len": cfg.seq_len, **heldout_loss(model, ids, family, cfg.ratios, cfg.seed, cfg.batch_size)}
    line = json.dumps(result)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
