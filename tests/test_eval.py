"""The evaluator's plumbing: pass@k against its closed form, held-out loss, eval.run and eval.ablate end to end on
the tiny models (pass rates ~0 there: what is tested is that generation, execution, scoring and the report work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from math import comb

import pytest
import torch

from eval.heldout import heldout_loss
from eval.run import pass_at_k, score
from tests.conftest import ROOT, SHARED

HUMANEVAL = SHARED / "data" / "humaneval" / "HumanEval.jsonl.gz"
MBPP = SHARED / "data" / "mbpp" / "mbpp.jsonl"


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (10, 3, 5), (20, 0, 10), (20, 19, 10), (7, 7, 3)])
def test_pass_at_k_is_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    # and the probability that a random k-subset of the n samples holds a passing one
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(samples[i] for i in s) for s in subsets) / len(subsets))


def test_score_averages_over_problems():
    recs = [{"task_id": "a", "passed": p} for p in (True, False, False, False)]
    recs += [{"task_id": "b", "passed": p} for p in (True, True, True, False)]
    s = score(recs)
    assert s == {"pass@1": pytest.approx((0.25 + 0.75) / 2)}  # k=10 needs n >= 10


def test_heldout_cli_last_line_is_json(tmp_path):
    out = tmp_path / "h.json"
    p = subprocess.run([sys.executable, "-m", "eval.heldout", f"checkpoint={ROOT / 'checkpoints/micro-coda'}",
                        "data=stdlib", "max_docs=3", "max_rows=4", "seq_len=64", f"out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["tokens"] > 0 and 4.0 < last["loss"] < 8.0 and json.loads(out.read_text()) == last
    assert {"loss@0.1", "loss@0.9"} <= last.keys()  # diffusion: the mask-ratio grid
    bad = subprocess.run([sys.executable, "-m", "eval.heldout", "data=stdlib"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_heldout_loss_is_deterministic_and_family_specific():
    from qat.models import load

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    coda, _ = load(ROOT / "checkpoints/micro-coda")
    a = heldout_loss(coda, ids, "coda", [0.2, 0.8], seed=3)
    assert a == heldout_loss(coda, ids, "coda", [0.2, 0.8], seed=3)
    assert a["loss"] == pytest.approx((a["loss@0.2"] + a["loss@0.8"]) / 2)
    qwen, _ = load(ROOT / "checkpoints/micro-qwen3")
    ar = heldout_loss(qwen, ids, "qwen3", [0.5])
    assert ar["tokens"] == 4 * 31


def test_heldout_head_on_scored_positions_only_is_the_full_forward():
    """The held-out score runs the LM head only on the scored positions: the same losses as reading them from
    the full logits, for both families (a model without get_decoder takes the full forward)."""
    from qat import objectives
    from qat.models import load

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    for name, family in (("micro-coda", "coda"), ("micro-qwen3", "qwen3")):
        model, _ = load(ROOT / "checkpoints" / name)
        ex = (objectives.diffusion_example(ids, model.config.mask_token_id, sigma=torch.full((4,), 0.3),
                                           generator=torch.Generator().manual_seed(2))
              if family == "coda" else objectives.causal_example(ids))  # fmt: skip
        sel = ex.weight > 0
        with torch.no_grad():
            want = model(input_ids=ex.inputs).logits[:, :-1][sel]
            torch.testing.assert_close(objectives._logits_at(model, ex.inputs, sel), want, rtol=0, atol=1e-5)
            wrapped = torch.nn.Module()
            wrapped.forward, wrapped.config = model.forward, model.config  # no decoder/head accessors
            assert torch.equal(objectives._logits_at(wrapped, ex.inputs, sel), want)


@pytest.fixture(autouse=False)
def data_paths():
    if not (HUMANEVAL.is_file() and MBPP.is_file()):
        pytest.skip("shared HumanEval/MBPP data not available")
    return [f"paths.humaneval={HUMANEVAL}", f"paths.mbpp={MBPP}"]


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_run_end_to_end_on_a_tiny_artifact(tmp_path, data_paths, family):
    """A trained tiny artifact of each family: generate, execute, score; samples re-score to the same summary."""
    from eval.run import main
    from qat import train

    final = train.main([f"recipe=micro_{family}_int4", f"model.path={ROOT / f'checkpoints/micro-{family}'}",
                        f"out_dir={tmp_path / 'run'}", "train.steps=0"])  # fmt: skip
    out = tmp_path / "eval"
    summary = main([f"checkpoint={final}", *data_paths, "limit=2", "max_new_tokens=8", "batch_size=2",
                    f"out={out}", f"tb={tmp_path / 'tb'}"])  # fmt: skip
    for task in ("humaneval", "mbpp"):
        s = summary["tasks"][task]
        assert s["problems"] == 2 and s["samples"] == 2 and s["format"] == "instruct"
    lines = [json.loads(x) for x in (out / "samples.jsonl").open()]
    for task in ("humaneval", "mbpp"):  # pass@1 (n = 1) is the share of that task's samples whose status passed
        mine = [r for r in lines if r["task"] == task]
        assert summary["tasks"][task]["pass@1"] == sum(r["status"] == "passed" for r in mine) / len(mine)
        assert all(r["passed"] == (r["status"] == "passed") for r in mine)
    assert len(lines) == 4 and all({"prompt", "completion", "program", "status", "passed"} <= r.keys() for r in lines)
    assert all(r["prompt"].startswith("<|im_start|>user") for r in lines)
    from eval.run import runnable
    from eval.sandbox import Split

    for r in lines:  # solution and tests ran in two processes, split where the record says
        split = runnable(r)
        assert isinstance(split, Split) and split.candidate + "\n" + split.tests == r["program"]
        assert "assert" in split.tests and "assert" not in split.candidate.split("def ")[0]
    assert summary["family"] == family and summary["quantization"]["bits"] == 4
    again = main([f"rescore={out}"])
    assert again["tasks"] == json.loads((out / "summary.json").read_text())["tasks"]
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


def test_run_scores_a_correct_completion_as_passed(tmp_path, data_paths, monkeypatch):
    """Plumbing check with a fake generator that answers with the reference: everything passes."""
    from eval import run as run_mod
    from eval import tasks

    problems = {p.task_id: p for p in tasks.load("humaneval", str(HUMANEVAL))[:3]}

    def oracle(model, tok, prompts, stops, cfg, generator=None):
        out = []
        for text in prompts:
            p = next(p for p in problems.values() if p.prompt in text)
            out.append((p.reference, 5))
        return out

    monkeypatch.setattr(run_mod, "generate", oracle)
    summary = run_mod.main([f"checkpoint={ROOT / 'checkpoints/micro-qwen3'}", *data_paths, "tasks=[humaneval]",
                            "limit=3", "format=completion", f"out={tmp_path}"])  # fmt: skip
    assert summary["tasks"]["humaneval"]["pass@1"] == 1.0


@pytest.mark.slow
def test_ablate_end_to_end_both_families(tmp_path):
    """The grid through the trainer (in-process cells) and the held-out metrics; report.md and pareto.png; resumable."""
    from eval.ablate import main

    args = ["recipes=[micro_qwen3_int4,micro_coda_int4]", "bits=[4,2]", "methods=[rtn,qat]", "metric=heldout",
            "seeds=[0]", f"out={tmp_path}", "heldout_rows=4", "heldout_seq_len=64",
            "set=[data.max_docs=3,train.steps=3,train.seq_len=64,train.batch_size=2,train.save_every=0,train.kd=0.5,"
            "train.kd_teacher=frozen]"]  # fmt: skip
    out = main(args)
    for recipe in ("micro_qwen3_int4", "micro_coda_int4"):  # the W2 QAT cell (after W4) read the teacher's states
        assert "train.teacher_cache: 3 batches read" in (out / recipe / "qat-w2-s0" / "train.log").read_text()
    assert not (out / ".teacher-cache").exists()  # deleted once every cell was done
    report = (out / "report.md").read_text()
    rows = [json.loads(x) for x in (out / "results.jsonl").open()]
    assert len(rows) == 2 * (2 + 2 * 2)
    assert {r["family"] for r in rows} == {"qwen3", "coda"} and all(r["heldout"] > 0 for r in rows)
    assert all(r["validation"] > 0 and r["corpora"]["heldout"].startswith("pkg:accelerate==") for r in rows)
    assert "Recovery" in report and "| coda | qat | 2 |" in report and "| qwen3 | ft | 16 |" in report
    assert (out / "pareto.png").stat().st_size > 1000
    # the latency pass: every cell timed at the end, its step and path named
    assert all(r["latency_ms"] > 0 and r["latency_range"][0] <= r["latency_ms"] <= r["latency_range"][1] for r in rows)
    assert {r["family"]: r["latency_step"].split(",")[0] for r in rows} == {
        "qwen3": "decode step", "coda": "32 tokens in 32 denoising steps after a 96-token prompt"}  # per token
    assert all(r["latency_path"].startswith("cpu float32, ") for r in rows) and "ms/token" in report
    again = main(args)  # every cell is skipped (and timed again, all under the same conditions)
    timing = ("latency_ms", "latency_range")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(json.loads(x) for x in (again / "results.jsonl").open()) == strip(rows)
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    main([*args, "report_only=true"])  # the report rebuilt from the cells' result.json alone
    assert (out / "report.md").read_text() == report


def test_study_claims_are_exclusive_and_a_dead_workers_claim_is_taken_over(tmp_path):
    from eval.ablate import claim

    cell = tmp_path / "cell"
    with claim(cell) as mine:
        assert mine and (cell / ".claim").read_text() == str(os.getpid())
        with claim(cell) as again:  # held by a live process (this one)
            assert not again
    assert not (cell / ".claim").exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cell / ".claim").write_text(dead.stdout.strip())  # a worker that died holding the cell
    with claim(cell) as mine:
        assert mine


@pytest.mark.slow
def test_ablate_workers_share_the_cells_and_agree_with_one_process(tmp_path):
    """workers=2: every cell run once (by either worker), no claim left, the same results as one process; the
    parent alone times the cells and writes the report."""
    from eval.ablate import main

    args = ["recipes=[micro_qwen3_int4,micro_coda_int4]", "bits=[2]", "methods=[rtn,qat]", "metric=heldout",
            "seeds=[0]", "heldout_rows=4", "heldout_seq_len=64", "latency_rounds=1",
            "set=[data.max_docs=3,train.steps=3,train.seq_len=64,train.batch_size=2,train.save_every=0]"]  # fmt: skip
    one = main([*args, f"out={tmp_path / 'one'}"])
    two = main([*args, f"out={tmp_path / 'two'}", "workers=2"])
    rows = lambda out: [json.loads(x) for x in (out / "results.jsonl").open()]  # noqa: E731
    a, b = rows(one), rows(two)
    assert [(r["recipe"], r["cell"]) for r in a] == [(r["recipe"], r["cell"]) for r in b] and len(a) == 8
    for x, y in zip(a, b, strict=True):
        assert y["validation"] == pytest.approx(x["validation"], rel=1e-4)
        assert y["heldout"] == pytest.approx(x["heldout"], rel=1e-4) and y["latency_ms"] > 0
    assert not list(two.glob("*/*/.claim")) and (two / "report.md").is_file()


def test_repeated_diffusion_samples_differ(tmp_path, data_paths):
    """n samples of one prompt, one per batch: the sampler's stream runs on, so the samples are not copies."""
    from eval.run import main

    main([f"checkpoint={ROOT / 'checkpoints/micro-coda'}", *data_paths, "tasks=[humaneval]", "limit=1", "n=3",
          "temperature=1.0", "batch_size=1", "max_new_tokens=8", f"out={tmp_path}"])  # fmt: skip
    completions = [json.loads(x)["completion"] for x in (tmp_path / "samples.jsonl").open()]
    assert len(completions) == 3 and len(set(completions)) > 1


def test_run_records_the_sampler_and_whether_it_is_the_reference(tmp_path, data_paths):
    from eval.run import main

    common = [f"checkpoint={ROOT / 'checkpoints/micro-coda'}", *data_paths, "tasks=[humaneval]", "limit=1",
              "max_new_tokens=8"]  # fmt: skip
    ref = main([*common, f"out={tmp_path / 'ref'}"])
    assert ref["sampler"] == {"steps": 8, "alg": "entropy", "lean": True, "block_length": 0, "cache": "",
                              "threshold": 0.0, "reference": True}  # fmt: skip
    cached = main([*common, "sampler.block_length=4", "sampler.cache=dual", "sampler.threshold=0.9",
                   f"out={tmp_path / 'cached'}"])  # fmt: skip
    assert cached["sampler"]["cache"] == "dual" and cached["sampler"]["reference"] is False
    assert json.loads((tmp_path / "cached" / "summary.json").read_text())["sampler"] == cached["sampler"]
