"""The PTQ-vs-QAT grid: every (family, method, bits) cell trained by the one trainer, scored by the one evaluator.

    python -m eval.ablate recipes=[tiny_qwen3_int4,tiny_coda_int4] bits=[8,4,3,2] methods=[rtn,gptq,qat]
                          [metric=auto|passk|heldout] [out=ablations/NAME] [limit=0] [set=[train.steps=50,...]]

(`recipe=NAME` for one family.) Per recipe the cells are:

    base        the unquantized model as loaded (`quant.bits=16 train.steps=0`)
    ft          the unquantized model fine-tuned with exactly the QAT recipe (`quant.bits=16`): what training
                alone gives, so QAT is not credited with it
    rtn|gptq|awq   PTQ at each bit width (`quant.init=M train.steps=0`)
    qat         QAT at each bit width, from the recipe's own init (`quant.init` of the recipe, usually rtn)
    qat-gptq    QAT started from the GPTQ solution (`quant.init=gptq`, frozen teacher when distilling)

Each cell is `python qat/train.py recipe=R out_dir=OUT/R/CELL ...` in a subprocess (a clean process per run, as
a user would launch it), then the metric on `OUT/R/CELL/final`:

    heldout   `eval.heldout` loss on code the training never saw (default: the stdlib's email package); lower
              is better. The metric for tiny models, which solve no HumanEval problem.
    passk     `eval.run` pass@1 per task (HumanEval, MBPP); higher is better.
    auto      heldout below 50M parameters, passk otherwise.

Resumable: a cell whose `final/` and `result.json` exist is skipped, so an interrupted grid continues where it
stopped. Outputs in `out`: `results.jsonl` (one line per cell), `report.md` (family × method × bits → metric per
task, change vs base, recovery = (QAT − PTQ)/(FT − PTQ) against the best PTQ method at that width, bytes of
the weights file, latency of one forward of a 1×128 batch), and `pareto.png` (metric vs bytes, a line per
family and method).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from qat.config import RecipeError, exit_on_error, load_recipe, parse_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PTQ = ("rtn", "gptq", "awq")


@dataclass
class AblateConfig:
    recipe: str = ""
    recipes: list[str] = field(default_factory=list)
    bits: list[int] = field(default_factory=lambda: [8, 4, 3, 2])
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq", "qat"])
    metric: str = "auto"  # auto | passk | heldout
    out: str = ""
    limit: int = 0  # passk: first N problems per task
    tasks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"])
    heldout_data: str = ""  # heldout: "" = the stdlib's email package
    heldout_rows: int = 64
    heldout_seq_len: int = 256
    set: list[str] = field(default_factory=list)  # extra recipe overrides for every cell

    def __post_init__(self) -> None:
        if self.recipe:
            self.recipes = [self.recipe, *self.recipes]
        if not self.recipes:
            raise RecipeError("give recipe=NAME or recipes=[A,B]")
        bad = [m for m in self.methods if m not in (*PTQ, "qat", "qat-gptq")]
        if bad:
            raise RecipeError(f"unknown methods {bad}: use rtn, gptq, awq, qat, qat-gptq")
        if self.metric not in ("auto", "passk", "heldout"):
            raise RecipeError(f"metric must be auto, passk or heldout, got {self.metric!r}")


def cells(cfg: AblateConfig) -> list[tuple[str, str, int, list[str]]]:
    """(cell name, method, bits, recipe overrides) in run order."""
    out = [("base", "base", 16, ["quant.bits=16", "train.steps=0"]), ("ft", "ft", 16, ["quant.bits=16"])]
    for b in cfg.bits:
        for m in cfg.methods:
            if m in PTQ:
                over = [f"quant.bits={b}", f"quant.init={m}", "train.steps=0"]
            elif m == "qat":
                over = [f"quant.bits={b}"]
            else:
                over = [f"quant.bits={b}", "quant.init=gptq", "train.kd_teacher=frozen"]
            out.append((f"{m}-w{b}", m, b, over))
    return out


def train_cell(recipe: str, out_dir: Path, overrides: list[str], log: Path) -> None:
    cmd = [sys.executable, str(ROOT / "qat" / "train.py"), f"recipe={recipe}", f"out_dir={out_dir}", *overrides]
    with log.open("w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise RuntimeError(f"training cell failed (exit {p.returncode}): {' '.join(cmd)}; see {log}")


@torch.no_grad()
def latency_ms(model, vocab: int, tokens: int = 128, repeats: int = 3) -> float:
    ids = torch.randint(0, min(vocab, 256), (1, tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    model(input_ids=ids)  # warmup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(final: Path, metric: str, cfg: AblateConfig) -> dict:
    """{task: value} (+ bytes, latency) for one artifact."""
    from qat.models import load

    model, tok = load(final)
    result = {"bytes": (final / "model.safetensors").stat().st_size,
              "latency_ms": latency_ms(model, model.config.vocab_size)}  # fmt: skip
    if metric == "heldout":
        from eval.heldout import heldout_loss
        from qat import data
        from qat.config import DataConfig
        from qat.models import family_of

        path = cfg.heldout_data or str(data.stdlib_dir() / "email")
        rows = data.pack(data.load_documents(DataConfig(path=path)), tok, cfg.heldout_seq_len)
        ids = torch.stack([rows[i]["input_ids"] for i in range(min(cfg.heldout_rows, len(rows)))])
        result["heldout"] = heldout_loss(model, ids, family_of(str(final)), [0.1, 0.3, 0.5, 0.7, 0.9])["loss"]
    else:
        from eval.run import EvalConfig, evaluate

        summary = evaluate(EvalConfig(checkpoint=str(final), tasks=list(cfg.tasks), limit=cfg.limit,
                                      out=str(final.parent / "eval")))  # fmt: skip
        result.update({t: s["pass@1"] for t, s in summary["tasks"].items()})
    return result


def run(cfg: AblateConfig) -> Path:
    out = Path(cfg.out or ROOT / "ablations" / "_".join(cfg.recipes))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe_name in cfg.recipes:
        recipe = load_recipe([f"recipe={recipe_name}", *cfg.set])
        family = recipe.model.family
        metric = cfg.metric
        for name, method, bits, over in cells(cfg):
            cell = out / recipe_name / name
            done = cell / "result.json"
            if done.is_file() and (cell / "final" / "quantization.json").is_file():
                rows.append(json.loads(done.read_text()))
                print(f"{recipe_name}/{name}: done earlier")
                continue
            cell.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            train_cell(recipe_name, cell, [*cfg.set, *over], cell / "train.log")
            if metric == "auto":  # decided on the first (unquantized) cell
                metric = "heldout" if parameters(cell / "final") < 50e6 else "passk"
            row = {"recipe": recipe_name, "family": family, "cell": name, "method": method, "bits": bits,
                   "metric": metric, **measure(cell / "final", metric, cfg),
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            done.write_text(json.dumps(row) + "\n")
            rows.append(row)
            print(f"{recipe_name}/{name}: {row}")
    with (out / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    report(rows, out)
    return out


def parameters(final: Path) -> int:
    from qat.models import load

    model, _ = load(final)
    return sum(p.numel() for p in model.parameters())


def _keys(rows: list[dict]) -> list[str]:
    skip = {"recipe", "family", "cell", "method", "bits", "metric", "bytes", "latency_ms", "seconds"}
    return list(dict.fromkeys(k for r in rows for k in r if k not in skip))


def report(rows: list[dict], out: Path) -> None:
    """report.md and pareto.png from the cell rows."""
    keys = _keys(rows)
    lines = ["# PTQ vs QAT", "",
             "| family | method | bits | " + " | ".join(keys) + " | Δ vs base | recovery | MiB | ms/forward |",
             "|---|---|---:|" + "---:|" * len(keys) + "---:|---:|---:|---:|"]  # fmt: skip
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        base = next((r for r in fam if r["method"] == "base"), None)
        ft = next((r for r in fam if r["method"] == "ft"), None)
        lower_better = fam[0]["metric"] == "heldout"
        for r in fam:
            k0 = keys[0]
            delta = "" if base is None or r is base else f"{r[k0] - base[k0]:+.4f}"
            recovery = ""
            if r["method"].startswith("qat") and ft is not None:
                ptq = [p for p in fam if p["method"] in PTQ and p["bits"] == r["bits"]]
                if ptq:
                    best = (min if lower_better else max)(ptq, key=lambda p: p[k0])
                    den = ft[k0] - best[k0]
                    recovery = f"{(r[k0] - best[k0]) / den:.2f} (vs {best['method']})" if den else "n/a"
            vals = " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
            lines.append(f"| {family} | {r['method']} | {r['bits']} | {vals} | {delta} | {recovery} | "
                         f"{r['bytes'] / 2**20:.2f} | {r['latency_ms']:.1f} |")  # fmt: skip
    metric = rows[0]["metric"] if rows else ""
    lines += ["", f"Metric: {metric} ({'lower' if metric == 'heldout' else 'higher'} is better). Recovery = (QAT − PTQ)"
              " / (FT − PTQ) with the best PTQ method at the same bits; FT = the unquantized model trained with the"
              " same recipe. Δ vs base: metric change against the unquantized base model.", ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines))
    pareto(rows, keys[0] if keys else "", out / "pareto.png")


def pareto(rows: list[dict], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(r["family"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["family"] == family):
            pts = sorted((r["bytes"] / 2**20, r[key]) for r in rows if r["family"] == family and r["method"] == method)
            style = "o-" if len(pts) > 1 else "s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{family} {method}")
    ax.set_xlabel("weights file (MiB)")
    ax.set_ylabel(key)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    with exit_on_error(FileNotFoundError):
        cfg = parse_cli(AblateConfig, sys.argv[1:] if argv is None else argv)
        for name in cfg.recipes:
            load_recipe([f"recipe={name}", *cfg.set])  # fail early on a bad recipe or override
    out = run(cfg)
    print(f"report: {out / 'report.md'}  plot: {out / 'pareto.png'}")
    return out


if __name__ == "__main__":
    main()
