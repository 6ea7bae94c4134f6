"""A distillation QAT step of the study's recipes: the trainer's step today vs the step before its two cuts.

    python benchmarks/qat_step.py [--families qwen3,coda] [--bits 2] [--steps 4] [--rounds 3] [--threads 1]

What is measured. One optimizer step of `tiny_<family>_int<bits>` (the committed tiny base, RTN init, LSQ scales,
pure distillation from a frozen float copy, 8 × 256 tokens): the loss, its backward and the AdamW step, on a
fixed set of batches of the stdlib's train split (the same batches, and for CoDA the same noise, in every
variant), in three variants:

    before    the step as the trainer computed it before: both models' LM heads on every position ([B, L, V]
              logits, then the scored rows selected: a boolean-index copy and, in the backward, a zero-filled
              [B, L, V] gradient for CoDA; a slice and its scatter for Qwen3), the logits divided by T = 1, and
              the logged CE from a log-softmax of its own
    scored    `qat.train.compute_loss` as it is: the heads on the scored positions only (`objectives.scored_head`),
              no division by T = 1, the CE read off KD's student log-softmax; the teacher recomputed
    cached    the same with the teacher's decoder read back from `train.teacher_cache` (what every QAT cell of
              the study but the first of a family and seed gets; qat/teacher_cache.py)

How. Variants are interleaved over R rounds; a round's time is the median of N steps after one warmup step;
each variant keeps its smallest round (load from other jobs only ever adds time). One thread by default, as
each `eval.ablate workers=2` process runs. The losses of the three variants on the first batch are printed
beside the times: `scored` and `cached` must agree with `before` (the same quantity, summed in another order).
Nothing here asserts a threshold: it only prints.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qat import data, objectives  # noqa: E402
from qat.config import load_recipe  # noqa: E402
from qat.ptq.pipeline import quantize_model  # noqa: E402
from qat.teacher_cache import TeacherCache  # noqa: E402
from qat.train import compute_loss, load_model, param_groups  # noqa: E402

VARIANTS = ("before", "scored", "cached")


def before_loss(recipe, model, teacher, batch: dict, rng: torch.Generator) -> torch.Tensor:
    """The step's loss as computed before the cuts (see the module docstring), pure distillation."""
    t = recipe.train
    ex = objectives.example(recipe.model.family, batch, model.config, recipe.diffusion, rng)
    out = model(input_ids=ex.inputs)
    with torch.no_grad():
        objectives.ce_loss(out.logits, ex)  # logged only
        t_logits = teacher(input_ids=ex.inputs).logits
    s, w = objectives._selected(out.logits, ex)
    tt, _ = objectives._selected(t_logits, ex)
    T = t.kd_temperature
    log_s, log_t = F.log_softmax(s / T, -1), F.log_softmax(tt / T, -1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return (kl * w).sum() / ex.norm * T * T


def setup(family: str, bits: int, cache_dir: Path):
    recipe = load_recipe([f"recipe=tiny_{family}_int{bits}", "quant.init=rtn", "out_dir=/tmp/unused"])
    model, tok = load_model(recipe)
    model.config.use_cache = False
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    quantize_model(model, tok, recipe, progress=False)
    model.train()
    rows = data.build(recipe.data, tok, recipe.train.seq_len, min_rows=recipe.train.batch_size)
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(rows), generator=g)[: recipe.train.batch_size * 8].tolist()
    ids = torch.stack([torch.as_tensor(rows[i]["input_ids"]) for i in pick])
    batches = [{"input_ids": b} for b in ids.split(recipe.train.batch_size)]
    return recipe, model, teacher, TeacherCache(teacher, cache_dir), batches


def step(variant: str, recipe, model, teacher, cached, batch: dict, i: int, opt) -> float:
    rng = objectives.noise_generator("cpu", 0, 0, i, 0)
    if variant == "before":
        loss = before_loss(recipe, model, teacher, batch, rng)
    else:
        loss = compute_loss(recipe, model, model, cached if variant == "cached" else teacher, batch, True, rng)[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="qwen3,coda")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), W{args.bits}, {args.steps} steps × {args.rounds} "
          "interleaved rounds per variant")  # fmt: skip
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            recipe, model, teacher, cached, batches = setup(family, args.bits, Path(tmp))
            start = copy.deepcopy(model.state_dict())
            for i, b in enumerate(batches[1 : args.steps + 1], 1):  # fill the cache of the timed batches
                cached(input_ids=objectives.example(family, b, model.config, recipe.diffusion,
                                                    objectives.noise_generator("cpu", 0, 0, i, 0)).inputs)
            first = {}
            for v in VARIANTS:  # the first batch's loss from the same weights (and batch 0 into the cache)
                model.load_state_dict(start)
                opt = torch.optim.AdamW(param_groups(model, 0.0, recipe.train.scales_lr_ratio), lr=recipe.train.lr)
                first[v] = step(v, recipe, model, teacher, cached, batches[0], 0, opt)
            best = dict.fromkeys(VARIANTS, float("inf"))
            for _ in range(args.rounds):
                for v in VARIANTS:
                    model.load_state_dict(start)
                    opt = torch.optim.AdamW(param_groups(model, 0.0, recipe.train.scales_lr_ratio), lr=recipe.train.lr)
                    step(v, recipe, model, teacher, cached, batches[0], 0, opt)  # warmup
                    times = []
                    for i, b in enumerate(batches[1 : args.steps + 1], 1):
                        t0 = time.perf_counter()
                        step(v, recipe, model, teacher, cached, b, i, opt)
                        times.append(time.perf_counter() - t0)
                    best[v] = min(best[v], statistics.median(times))
            print(f"\n{family} W{args.bits} (8 × 256 tokens): s/step and × before; first-batch loss")
            for v in VARIANTS:
                print(f"  {v:7s} {best[v]:6.3f} s  {best['before'] / best[v]:5.2f}×  loss {first[v]:.6f}")


if __name__ == "__main__":
    main()
