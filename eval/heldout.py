"""Held-out loss of a checkpoint on Python code: the metric for models too small to solve HumanEval/MBPP.

    python -m eval.heldout checkpoint=DIR [data=pkg:accelerate] [split=all] [seq_len=256] [max_docs=0]
                           [max_rows=64] [batch_size=8] [ratios=[0.1,0.3,0.5,0.7,0.9]] [seed=0] [out=FILE.json]

Data: any `data.path` the trainer accepts (a directory of source files, `stdlib`, `pkg:NAME`, a jsonl/parquet
file), all of it (`split=all`) or one side of its path-hash split (`split=validation`: the stdlib files the tiny
bases never trained on). The default, the installed `accelerate` package's sources, is code that no recipe here
trains on; the result names the corpus and its version (`corpus`). Packed
into windows of `seq_len` tokens exactly as for training; `max_rows` windows evenly spaced over the whole corpus are
scored (deterministic; `data.spread`).

    AR (qwen3)        mean next-token negative log-likelihood over every target token
    diffusion (coda)  masked-token NLL: for each mask ratio r of a fixed grid, every window is noised with ratio
                      r (a fixed seed, so every checkpoint sees the same masks), and the NLL of the masked tokens
                      is averaged; the loss is the mean over the grid. (Not the 1/r-weighted ELBO: a plain NLL per
                      masked token, comparable across checkpoints of one family, not across families.)

The last line of stdout is a JSON object with at least `loss` and `tokens` (tokens scored), also written to `out`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from qat import data  # noqa: E402
from qat.config import DataConfig, RecipeError, exit_on_error, parse_cli  # noqa: E402
from qat.objectives import HELDOUT_RATIOS, heldout_loss  # noqa: E402,F401  (heldout_loss: re-exported)


@dataclass
class HeldoutConfig:
    checkpoint: str = "???"
    data: str = "pkg:accelerate"
    split: str = "all"  # directory sources: all | train | validation (qat.data's path-hash split)
    glob: str = "*.py"
    text_field: str = "content"
    seq_len: int = 256
    max_docs: int = 0
    max_rows: int = 64
    batch_size: int = 8
    ratios: list[float] = field(default_factory=lambda: list(HELDOUT_RATIOS))
    seed: int = 0
    out: str = ""

    def __post_init__(self) -> None:
        for k, least in (("max_rows", 1), ("batch_size", 1), ("seq_len", 2)):
            if getattr(self, k) < least:
                raise RecipeError(f"{k} must be >= {least}, got {getattr(self, k)}")
        if self.max_docs < 0:
            raise RecipeError(f"max_docs must be >= 0, got {self.max_docs}")
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise RecipeError(f"ratios must be mask ratios in (0, 1], got {self.ratios}")


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
        dcfg = DataConfig(path=cfg.data, glob=cfg.glob, text_field=cfg.text_field, max_docs=cfg.max_docs,
                          split=cfg.split)  # fmt: skip
        ids = data.windows(dcfg, tok, cfg.seq_len, cfg.max_rows)
    result = {"checkpoint": cfg.checkpoint, "family": family, "data": cfg.data, "corpus": data.describe(dcfg),
              "windows": len(ids),
              "seq_len": cfg.seq_len, **heldout_loss(model, ids, family, cfg.ratios, cfg.seed, cfg.batch_size)}
    line = json.dumps(result)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
