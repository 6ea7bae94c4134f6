"""The PTQ-vs-QAT study: every (family, method, bits, seed) cell trained by the one trainer, scored by one evaluator.

    python -m eval.ablate recipes=[tiny_qwen3_int4,tiny_coda_int4] [bits=[8,4,3,2]]
                          [methods=[rtn,gptq,awq,qat,qat-gptq]] [seeds=[0,1]] [seed_bits=[4,2]]
                          [metric=auto|passk|heldout] [heldout_data=pkg:accelerate] [out=ablations/NAME]
                          [set=[train.steps=50,...]] [limit=0] [workers=1] [report_only=false]

(`recipe=NAME` for one family.) A width's cells run that width's own recipe when the family has one per width
(`tiny_qwen3_int2` for bits 2 of `tiny_qwen3_int4`: each width keeps its grid), else the given recipe with
`quant.bits` replaced. Cells per recipe:

    base           the unquantized model as loaded (`quant.bits=16 train.steps=0`)
    ft             the unquantized model trained with the QAT recipe's data, steps, schedule and learning rate
                   and plain cross-entropy (`quant.bits=16 train.kd=0`): what training alone gives, so QAT is not
                   credited with it; one cell per seed
    rtn|gptq|awq   PTQ at each width (`quant.init=M train.steps=0`)
    qat            QAT at each width from the recipe's own init (usually rtn)
    qat-gptq       QAT from the GPTQ solution (`quant.init=gptq`, frozen teacher when distilling)
                   (both QAT methods: every seed at `seed_bits`, seed 0 elsewhere)

Metrics per cell (`metric=heldout`, the tiny models' metric, which solve no HumanEval problem; `auto` picks it
below 50M parameters): `validation`, the held-out loss (eval.heldout's definition: NLL per token, or masked-token
NLL for diffusion) on the training source's validation split, and `heldout`, the same loss on a second corpus
the training never saw (`heldout_data`, default the installed `accelerate` package's sources, named with its
version in every result). `metric=passk` adds pass@1 per task (eval.run) instead of `heldout`.

Recovery = (QAT − PTQ) / (FT − PTQ), per metric, where PTQ is the best PTQ method at that width *chosen on the
validation split* and FT the mean of the ft seeds; 1 = QAT closes the whole gap PTQ leaves against the same
training without quantization, 0 = no better than PTQ. The formula holds for either direction of a metric. With
several seeds the report gives the mean and the range over QAT seeds; where FT is not better than the best PTQ
(typically W8) recovery is undefined and shown as n/a.

Cells run in this process, one after another (`qat.train.main`, the trainer's own entry point; its output goes
to `<cell>/train.log`), so the interpreter, the libraries and the tokenized data (memoized by qat.data) are paid
for once, not per cell. Resumable: a cell whose `result.json` exists is skipped (that small file is all a finished
cell needs, so committing the `result.json` files carries a study over to another machine; with
`set=[train.resume=auto]` an interrupted cell continues from its last checkpoint). Outputs in `out`:
`results.jsonl` (one line per cell), `report.md` (the table, with the corpus, metric, direction and recovery
definition) and `pareto.png` (held-out metric vs weights-file size, one panel per family).

Workers (`workers=N`): the study starts N processes of itself, each with 1/N of the cores (`OMP_NUM_THREADS`,
unless set) and its own memo of tokenized data. Each takes the next cell nobody holds (a `.claim` file with its
pid, created atomically in the cell's directory; the claim of a process that died is taken over), the training
cells of every recipe first and interleaved, then the quick PTQ cells, so the families share the cores evenly
whatever each costs (one process per family left the faster one idle at the end). When all have finished, this
process runs the latency pass alone and writes the report. An interrupted study resumes with the same command.

Shared teacher (`teacher_cache`, on by default): the QAT cells distil from the same frozen float model on the
same batches (every width and both QAT methods draw the same data order and diffusion noise for one seed), so
the teacher's last hidden state per batch is computed by the first cell that needs it and read back by the
others (`train.teacher_cache=<out>/.teacher-cache`, qat/teacher_cache.py: keyed by the teacher's weights, the
batch and the thread count, so the results are bit for bit those of recomputing it). The directory (~2 MiB a
step per family and seed) is deleted when every cell is done.

Latency (`latency_rounds`, 0 = off): after the last cell, every cell's artifact is timed in one pass, under the
same conditions (qat/latency.py), per generated token: a decode step with a 128-token KV cache for Qwen3, a
32-token generation by the reference sampler (one token per step) divided by 32 for CoDA — with the inference
modules' automatic kernel choice
(qat/kernels.py), `latency_rounds` interleaved rounds over the cells of a recipe (at most `latency_models`
loaded at once), median and range, labelled with the device, dtype and the paths the quantized linears took.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from qat.config import RECIPES_DIR, DataConfig, RecipeError, exit_on_error, load_recipe, parse_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PTQ = ("rtn", "gptq", "awq")
QAT = ("qat", "qat-gptq")
TEACHER_CACHE = ".teacher-cache"  # in `out`: the QAT cells' shared teacher states (train.teacher_cache)
HELDOUT_DEFAULT = "pkg:accelerate"  # third-party code every install of this toolkit has, at its pinned version


@dataclass
class AblateConfig:
    recipe: str = ""
    recipes: list[str] = field(default_factory=list)
    bits: list[int] = field(default_factory=lambda: [8, 4, 3, 2])
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq", "awq", "qat", "qat-gptq"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # ft and qat seeds (train.seed)
    seed_bits: list[int] = field(default_factory=lambda: [4, 2])  # widths where qat and qat-gptq run every seed
    metric: str = "auto"  # auto | passk | heldout
    out: str = ""
    limit: int = 0  # passk: first N problems per task
    tasks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"])
    heldout_data: str = HELDOUT_DEFAULT  # any data.path: pkg:NAME, a directory, a jsonl file
    heldout_rows: int = 128  # windows scored (validation and held-out)
    heldout_seq_len: int = 256
    set: list[str] = field(default_factory=list)  # extra recipe overrides for every cell
    report_only: bool = False  # rebuild results.jsonl, report.md, pareto.png from the finished cells; run nothing
    latency_rounds: int = 10  # interleaved timing rounds over all cells after the last one (0 = no latency pass)
    latency_models: int = 64  # models loaded at once for the interleaved pass (lower it for large models)
    workers: int = 1  # processes sharing the cells of every recipe (module docstring); 1 = this process alone
    teacher_cache: bool = True  # QAT cells share their frozen teacher's forward per batch (module docstring)
    worker: bool = False  # set by the parent on its worker processes: run claimed cells only, no latency, no report

    def __post_init__(self) -> None:
        if self.recipe:
            self.recipes = [self.recipe, *self.recipes]
        if not self.recipes:
            raise RecipeError("give recipe=NAME or recipes=[A,B]")
        bad = [m for m in self.methods if m not in (*PTQ, *QAT)]
        if bad:
            raise RecipeError(f"unknown methods {bad}: use rtn, gptq, awq, qat, qat-gptq")
        if self.metric not in ("auto", "passk", "heldout"):
            raise RecipeError(f"metric must be auto, passk or heldout, got {self.metric!r}")
        if not self.seeds:
            raise RecipeError("seeds must name at least one seed")
        if not self.bits or not set(self.bits) <= {2, 3, 4, 8}:
            raise RecipeError(f"bits must be a non-empty subset of [8, 4, 3, 2], got {self.bits}")
        for k, least in (("heldout_rows", 1), ("heldout_seq_len", 1), ("limit", 0), ("latency_rounds", 0),
                         ("latency_models", 1), ("workers", 1)):
            if getattr(self, k) < least:
                raise RecipeError(f"{k} must be >= {least}, got {getattr(self, k)}")


@dataclass
class Cell:
    name: str
    method: str
    bits: int
    seed: int
    overrides: list[str]


def cells(cfg: AblateConfig) -> list[Cell]:
    """The grid of one recipe, in run order."""
    out = [Cell("base", "base", 16, cfg.seeds[0], ["quant.bits=16", "train.steps=0"])]
    plain = ["quant.bits=16", "train.kd=0", "train.kd_hidden=0"]  # unquantized, plain cross-entropy
    out += [Cell(f"ft-s{s}", "ft", 16, s, [*plain, f"train.seed={s}"]) for s in cfg.seeds]
    for b in cfg.bits:
        for m in cfg.methods:
            if m in PTQ:
                out.append(Cell(f"{m}-w{b}", m, b, cfg.seeds[0], [f"quant.bits={b}", f"quant.init={m}",
                                                                   "train.steps=0"]))  # fmt: skip
                continue
            over = [f"quant.bits={b}"] + (["quant.init=gptq", "train.kd_teacher=frozen"] if m == "qat-gptq" else [])
            seeds = cfg.seeds if b in cfg.seed_bits else cfg.seeds[:1]
            out += [Cell(f"{m}-w{b}-s{s}", m, b, s, [*over, f"train.seed={s}"]) for s in seeds]
    return out


def width_recipe(name: str, bits: int) -> str:
    """The recipe a width's cells run: `<family>_int<bits>` when `name` is one width of such a family of recipes
    (each width keeps its own grid: group size, symmetry), else `name` itself (with `quant.bits` overridden)."""
    m = re.fullmatch(r"(.+)_int\d+", name)
    if bits < 16 and m and (RECIPES_DIR / f"{m.group(1)}_int{bits}.yaml").is_file():
        return f"{m.group(1)}_int{bits}"
    return name


def train_cell(recipe: str, out_dir: Path, overrides: list[str], log: Path) -> None:
    """One trainer run in this process (qat.train.main), its output in `log`."""
    from qat import train

    argv = [f"recipe={recipe}", f"out_dir={out_dir}", *overrides]
    from accelerate.state import AcceleratorState, GradientState

    root = logging.getLogger()
    with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler, level = logging.StreamHandler(f), root.level  # the trainer's log lines go to this cell's log,
        root.addHandler(handler)  # not to a handler left bound to an earlier cell's (closed) file
        root.setLevel(logging.INFO)
        try:
            train.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:  # accelerate keeps process-wide singletons: the next cell starts from a clean slate
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            root.removeHandler(handler)
            root.setLevel(level)
    if code:
        raise RuntimeError(f"training cell failed (exit {code}): qat/train.py {' '.join(argv)}; see {log}")


def time_cells(rows: list[dict], out: Path, cfg: AblateConfig) -> None:
    """The latency pass (module docstring): adds latency_ms / latency_range / latency_step / latency_path to every
    row whose artifact is still there, and rewrites its result.json."""
    from qat import kernels, latency
    from qat.models import load

    kernels.forget()  # every cell decides its kernels in this pass, under the same conditions
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        todo = [r for r in rows if r["recipe"] == recipe and (out / recipe / r["cell"] / "final").is_dir()]
        for start in range(0, len(todo), cfg.latency_models):
            chunk, steps, what, models = todo[start : start + cfg.latency_models], {}, {}, {}
            tokens = {}
            for r in chunk:
                models[r["cell"]] = load(out / recipe / r["cell"] / "final")[0]
                steps[r["cell"]], what[r["cell"]], tokens[r["cell"]] = latency.step(models[r["cell"]], r["family"])
            timings = latency.interleaved(steps, rounds=cfg.latency_rounds)
            for r in chunk:
                t, n = timings[r["cell"]], tokens[r["cell"]]  # per generated token
                r.update(latency_ms=round(t.median_ms / n, 3), latency_range=[round(t.min_ms / n, 3),
                                                                              round(t.max_ms / n, 3)],
                         latency_step=what[r["cell"]], latency_path=latency.label(models[r["cell"]]))
                (out / recipe / r["cell"] / "result.json").write_text(json.dumps(r) + "\n")
            del models, steps
            print(f"latency: {recipe}, {len(chunk)} cells × {cfg.latency_rounds} interleaved rounds", flush=True)


def corpora(recipe, cfg: AblateConfig) -> dict[str, DataConfig]:
    """{metric name: data source}: the recipe's validation split, and the held-out corpus."""
    from qat import data

    return {"validation": data.eval_source(recipe.data),
            "heldout": DataConfig(path=cfg.heldout_data, split="all")}  # fmt: skip


def measure(final: Path, metric: str, sources: dict[str, DataConfig], cfg: AblateConfig) -> dict:
    """{metric: value} (+ bytes, latency) for one artifact."""
    from qat import data
    from qat.models import family_of, load
    from qat.objectives import HELDOUT_RATIOS, heldout_loss

    model, tok = load(final)
    family = family_of(str(final))
    result = {"bytes": (final / "model.safetensors").stat().st_size}
    for name, source in sources.items():
        if name == "heldout" and metric == "passk":
            continue
        ids = data.windows(source, tok, cfg.heldout_seq_len, cfg.heldout_rows)
        result[name] = heldout_loss(model, ids, family, list(HELDOUT_RATIOS), batch_size=16)["loss"]
    if metric == "passk":
        from eval.run import EvalConfig, evaluate

        summary = evaluate(EvalConfig(checkpoint=str(final), tasks=list(cfg.tasks), limit=cfg.limit,
                                      out=str(final.parent / "eval")))  # fmt: skip
        result.update({t: s["pass@1"] for t, s in summary["tasks"].items()})
    return result


def run(cfg: AblateConfig) -> Path:
    out = Path(cfg.out or ROOT / "ablations" / "_".join(cfg.recipes))
    out.mkdir(parents=True, exist_ok=True)
    if cfg.workers > 1 and not cfg.worker and not cfg.report_only:
        spawn_workers(cfg, out)  # they run every cell; this process then finds them done
    rows, n = {}, len(cells(cfg))
    for recipe_name, recipe, i, c in jobs(cfg):
        cell = out / recipe_name / c.name
        done = cell / "result.json"
        if done.is_file():  # written last, after the artifact was measured: the cell is complete
            rows[recipe_name, c.name] = json.loads(done.read_text())
            print(f"[{i + 1}/{n}] {recipe_name}/{c.name}: done earlier", flush=True)
            continue
        if cfg.report_only:
            continue
        with claim(cell) as mine:
            if not mine:  # another worker runs it
                continue
            row = run_cell(cfg, recipe_name, recipe, c, cell)
            done.write_text(json.dumps(row) + "\n")  # before the claim goes: no other worker starts it again
        rows[recipe_name, c.name] = row
        shown = {k: round(v, 4) for k, v in row.items() if k in metric_keys([row])}
        print(f"[{i + 1}/{n}] {recipe_name}/{c.name}: {shown} ({row['seconds']} s)", flush=True)
        if not cfg.worker:
            write(ordered(rows, cfg), out)  # after every cell: an interrupted study still has its table so far
    if cfg.worker:
        return out
    rows = ordered(rows, cfg)
    if cfg.latency_rounds and not cfg.report_only:
        time_cells(rows, out, cfg)
    write(rows, out)
    if len(rows) == n * len(cfg.recipes):  # every cell done: the teacher cache has served its purpose
        shutil.rmtree(out / TEACHER_CACHE, ignore_errors=True)
    return out


def jobs(cfg: AblateConfig) -> list[tuple[str, object, int, Cell]]:
    """(recipe name, recipe, index in its grid, cell) in run order: recipe by recipe for one process; for workers,
    the training cells of all recipes first, interleaved (the longest jobs first keep the workers' loads even),
    then the quick ones."""
    grid = cells(cfg)
    recipes = {name: load_recipe([f"recipe={name}", *cfg.set]) for name in cfg.recipes}
    order = [(name, recipes[name], i, c) for name in cfg.recipes for i, c in enumerate(grid)]
    if cfg.worker:
        order = sorted(order, key=lambda j: (j[3].method in ("base", *PTQ), j[2], cfg.recipes.index(j[0])))
    return order


def ordered(rows: dict[tuple[str, str], dict], cfg: AblateConfig) -> list[dict]:
    """The rows in the report's order (recipe by recipe, grid order), whatever order the cells finished in."""
    grid = cells(cfg)
    return [rows[r, c.name] for r in cfg.recipes for c in grid if (r, c.name) in rows]


def run_cell(cfg: AblateConfig, recipe_name: str, recipe, c: Cell, cell: Path) -> dict:
    """Train (or PTQ) one cell through the trainer and measure its artifact: its result row."""
    from qat import data

    cell.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = width_recipe(recipe_name, c.bits)
    cache = cell.parent.parent / TEACHER_CACHE
    shared = [f"train.teacher_cache={cache}"] if cfg.teacher_cache and c.method in QAT else []
    train_cell(name, cell, [*shared, *cfg.set, *c.overrides], cell / "train.log")
    q = load_recipe([f"recipe={name}", *cfg.set, *c.overrides]).quant
    metric = cfg.metric if cfg.metric != "auto" else auto_metric(recipe)
    sources = corpora(recipe, cfg)
    names = {k: data.describe(v) for k, v in sources.items()}
    return {"recipe": recipe_name, "family": recipe.model.family, "cell": c.name, "method": c.method, "bits": c.bits,
            "seed": c.seed, "metric": metric, "corpora": names, "run_recipe": name,
            "grid": "" if c.bits == 16 else f"g{q.group_size} {'sym' if q.symmetric else 'asym'}",
            **measure(cell / "final", metric, sources, cfg), "seconds": round(time.perf_counter() - t0, 1)}


@contextlib.contextmanager
def claim(cell: Path):
    """Yields True when this process owns `cell` until the block ends (a `.claim` file holding its pid, created
    atomically), False when a live process does. A claim whose process is gone (a killed worker) is taken over, so
    a stopped study resumes with the same command."""
    cell.mkdir(parents=True, exist_ok=True)
    path = cell / ".claim"
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if attempt or not pid or _alive(pid):  # pid 0: just created, its pid not written yet
                yield False
                return
            path.unlink(missing_ok=True)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawn_workers(cfg: AblateConfig, out: Path) -> None:
    """`cfg.workers` processes of this study (`worker=true`), each with an equal share of the cores unless
    OMP_NUM_THREADS says otherwise; waits for all, and fails if one did."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.workers)))
    argv = [sys.executable, "-m", "eval.ablate", *sys_argv(cfg, out), "worker=true"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env) for _ in range(cfg.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a study worker failed (exit codes {codes}): see the cells' train.log files in {out}")


def sys_argv(cfg: AblateConfig, out: Path) -> list[str]:
    """This study's settings as command-line arguments (the workers' command)."""
    skip = {"recipe", "worker", "workers", "out"}
    args = [f"out={out}"]
    for k, v in vars(cfg).items():
        if k not in skip:
            args.append(f"{k}=[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}={v}")
    return args


def write(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    with (out / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    report(rows, out)


def auto_metric(recipe) -> str:
    """`heldout` for models under 50M parameters (the tiny ones, which solve no HumanEval problem), else `passk`:
    decided by the model the recipe starts from, so every cell of a recipe gets the same metric."""
    return "heldout" if parameter_count(recipe.model.path) < 50e6 else "passk"


@functools.cache
def parameter_count(path: str) -> int:
    """Parameters of the checkpoint at `path`, counted once per process: from its safetensors headers (no weights
    read), or from the loaded model when it is not a local directory (a hub id)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        from qat.models import load

        return sum(p.numel() for p in load(path)[0].parameters())
    n = 0
    for f in files:
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return n


# -------------------------------------------------------------------------------------------------- the report

NOT_METRICS = {"recipe", "family", "cell", "method", "bits", "seed", "metric", "corpora", "bytes", "latency_ms",
               "latency_range", "latency_step", "latency_path", "seconds", "run_recipe", "grid"}  # fmt: skip


def metric_keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k not in NOT_METRICS))


def lower_is_better(key: str) -> bool:
    """Losses (validation, heldout) go down; pass rates go up."""
    return key in ("validation", "heldout")


def recovery(qat: float, ptq: float, ft: float) -> float | None:
    """(QAT − PTQ) / (FT − PTQ): the share of the gap between the best PTQ and the unquantized fine-tune that
    QAT closes (either metric direction). None when FT is not better than PTQ (no gap to recover)."""
    gap = ft - ptq
    return None if gap == 0 else (qat - ptq) / gap


def _better(key: str, a: float, b: float) -> bool:
    return a < b if lower_is_better(key) else a > b


def best_ptq(fam: list[dict], bits: int) -> dict | None:
    """The PTQ cell at `bits` with the best validation loss (falls back to the first metric without one)."""
    ptq = [r for r in fam if r["method"] in PTQ and r["bits"] == bits]
    if not ptq:
        return None
    key = "validation" if all("validation" in r for r in ptq) else metric_keys(ptq)[0]
    return sorted(ptq, key=lambda r: r[key] if lower_is_better(key) else -r[key])[0]


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (family, method, bits): per metric the mean over seeds, its range, change vs base and, for
    QAT methods, recovery against the best PTQ at that width (mean and range over QAT seeds vs mean FT)."""
    keys = metric_keys(rows)
    lines = []
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        base = next((r for r in fam if r["method"] == "base"), None)
        ft = [r for r in fam if r["method"] == "ft"]
        for method, bits in dict.fromkeys((r["method"], r["bits"]) for r in fam):
            group = [r for r in fam if r["method"] == method and r["bits"] == bits]
            line = {"family": family, "method": method, "bits": bits, "n": len(group), "grid": group[0].get("grid", ""),
                    "mib": group[0]["bytes"] / 2**20, "metrics": {},
                    "latency_ms": statistics.median(r["latency_ms"] for r in group) if all(
                        "latency_ms" in r for r in group) else None,
                    "path": group[0].get("latency_path", "").split(", ", 1)[-1]}  # fmt: skip
            best = best_ptq(fam, bits) if method in QAT else None
            line["vs"] = best["method"] if best else None
            for k in keys:
                vals = [r[k] for r in group if k in r]
                if not vals:
                    continue
                m = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
                if base is not None and k in base and method != "base":
                    m["delta"] = m["mean"] - base[k]
                if best is not None and ft and k in best:
                    ft_mean = statistics.fmean(r[k] for r in ft)
                    if _better(k, ft_mean, best[k]):
                        recs = [recovery(v, best[k], ft_mean) for v in vals]
                        m["recovery"] = {"mean": statistics.fmean(recs), "min": min(recs), "max": max(recs)}
                    else:
                        m["recovery"] = None
                line["metrics"][k] = m
            lines.append(line)
    return lines


def _cell(m: dict | None, digits: int = 4) -> str:
    if m is None:
        return ""
    s = f"{m['mean']:.{digits}f}"
    return s + (f" ±{(m['max'] - m['min']) / 2:.{digits}f}" if m["max"] > m["min"] else "")


def _recovery(m: dict) -> str:
    if "recovery" not in m:
        return ""
    r = m["recovery"]
    if r is None:
        return "n/a"
    spread = f" [{r['min']:.0%}, {r['max']:.0%}]" if r["max"] > r["min"] else ""
    return f"{r['mean']:.0%}{spread}"


def report(rows: list[dict], out: Path) -> str:
    """report.md and pareto.png from the cell rows; returns the markdown."""
    keys = metric_keys(rows)
    lines = summarize(rows)
    corp = rows[0].get("corpora", {}) if rows else {}
    head = "| family | method | bits | grid | n | " + " | ".join(f"{k} | Δ {k} | rec. {k}" for k in keys)
    md = ["# PTQ vs QAT", "", head + " | MiB | ms/token | path | best PTQ |",
          "|---|---|---:|---|---:|" + "---:|---:|---:|" * len(keys) + "---:|---:|---|---|"]
    for ln in lines:
        cols = []
        for k in keys:
            m = ln["metrics"].get(k)
            cols += [_cell(m), "" if m is None or "delta" not in m else f"{m['delta']:+.4f}",
                     "" if m is None else _recovery(m)]  # fmt: skip
        md.append(f"| {ln['family']} | {ln['method']} | {ln['bits']} | {ln['grid']} | {ln['n']} | " + " | ".join(cols)
                  + f" | {ln['mib']:.2f} | {_ms(ln['latency_ms'])} | {ln['path']} | {ln['vs'] or ''} |")  # fmt: skip
    md += ["", "Metrics (lower is better for losses, higher for pass rates):"]
    for k in keys:
        what = {"validation": "held-out loss on the training source's validation split",
                "heldout": "held-out loss on a corpus the training never saw"}.get(k, "pass@1 (greedy)")  # fmt: skip
        unit = " (nats per token; masked-token NLL averaged over mask ratios 0.1–0.9 for diffusion)" if (
            lower_is_better(k)) else ""  # fmt: skip
        md.append(f"- `{k}`: {what}{unit}" + (f" — {corp[k]}" if k in corp else ""))
    md += ["", "Values are means over seeds (± half the range when n > 1). Recovery = (QAT − PTQ) / (FT − PTQ) per "
           "metric, PTQ = the best PTQ method at that width chosen on the validation split (column *best PTQ*), "
           "FT = the mean of the unquantized fine-tunes (same data, steps, schedule and learning rate, plain "
           "cross-entropy); [min, max] over QAT seeds; n/a where FT is not better than PTQ. Δ = change against the "
           "unquantized base. Losses compare checkpoints within a family, not across families.", ""]
    timed = [r for r in rows if "latency_step" in r]
    if timed:
        steps = "; ".join(f"{fam}: {s}" for fam, s in dict.fromkeys((r["family"], r["latency_step"]) for r in timed))
        devices = ", ".join(dict.fromkeys(r["latency_path"].split(",")[0] for r in timed))
        md += [f"ms/token: latency per generated token ({steps}), median of the interleaved rounds of one pass over "
               f"every cell after the last one ({devices}); *path*: the kernels the quantized linears took "
               "(qat/kernels.py: int4/int8 where measured faster, else the dequantized weight, `dense`).", ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    pareto(rows, "heldout" if "heldout" in keys else (keys[-1] if keys else ""), corp, out / "pareto.png")
    return text


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def pareto(rows: list[dict], key: str, corp: dict, path: Path) -> None:
    """Metric vs weights-file size, one panel per family; base and ft as horizontal references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(6 * max(1, len(families)), 4.5), squeeze=False)
    lines = summarize(rows)
    for ax, family in zip(axes[0], families, strict=False):
        for method in dict.fromkeys(ln["method"] for ln in lines if ln["family"] == family):
            pts = sorted((ln["mib"], ln["metrics"][key]["mean"], ln["bits"]) for ln in lines
                         if ln["family"] == family and ln["method"] == method and key in ln["metrics"])  # fmt: skip
            if method in ("base", "ft"):
                for _, y, _ in pts:
                    ax.axhline(y, ls="--" if method == "base" else ":", color="gray", lw=1)
                    ax.annotate(method, (ax.get_xlim()[0], y), fontsize=7, color="gray", va="bottom")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, ms=4)
            for x, y, b in pts:
                ax.annotate(f"W{b}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        better = "lower" if lower_is_better(key) else "higher"
        unit = "nats/token" if lower_is_better(key) else "pass@1"
        ax.set_title(f"{family}: {key} ({unit}, {better} is better)", fontsize=9)
        ax.set_xlabel("weights file (MiB)")
        ax.set_ylabel(f"{key} loss ({unit})" if lower_is_better(key) else key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if key in corp:
        fig.suptitle(f"PTQ vs QAT — {key}: {corp[key]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    with exit_on_error(FileNotFoundError):
        cfg = parse_cli(AblateConfig, sys.argv[1:] if argv is None else argv)
        for name in cfg.recipes:
            load_recipe([f"recipe={name}", *cfg.set])  # fail early on a bad recipe or override
        from qat import data

        if data.source_dir(cfg.heldout_data) is None and not Path(cfg.heldout_data).is_file():
            raise RecipeError(f"heldout_data={cfg.heldout_data}: not a directory, package (pkg:NAME) or file")
    out = run(cfg)
    print(f"report: {out / 'report.md'}  plot: {out / 'pareto.png'}")
    return out


if __name__ == "__main__":
    main()
