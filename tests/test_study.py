"""The embedded default and the study: corpus split, held-out corpus, tokenizer, recipe inheritance, trainer
validation, the recovery arithmetic, batch-independent diffusion generation, the committed trained bases."""

from __future__ import annotations

import json

import pytest
import torch

from qat import data
from qat.config import DataConfig, RecipeError, load_recipe
from tests.conftest import ROOT

WIDTHS = (8, 4, 3, 2)


# ------------------------------------------------------------------------------------------------ corpus


def test_stdlib_split_is_deterministic_disjoint_and_complete():
    train = data.files(DataConfig(path="stdlib", split="train"))
    val = data.files(DataConfig(path="stdlib", split="validation"))
    every = data.files(DataConfig(path="stdlib", split="all"))
    assert not set(train) & set(val) and sorted(set(train) | set(val)) == every
    assert 0.02 < len(val) / len(every) < 0.10  # val_fraction 0.05 of ~700 files
    assert data.files(DataConfig(path="stdlib", split="validation")) == val  # same call, same files
    assert not any({"test", "tests", "idle_test"} & set(p.parts) for p in every)


def test_split_depends_on_the_relative_path_only(tmp_path):
    """The same relative paths under two roots split the same way; more files never move existing ones."""
    names = [f"pkg{i}/mod{j}.py" for i in range(30) for j in range(4)]
    for root in (tmp_path / "a", tmp_path / "b"):
        for n in names:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_text(f"x = {n!r}\n")
    split = {r: {p.relative_to(tmp_path / r).as_posix() for p in data.files(DataConfig(path=str(tmp_path / r),
                                                                                        split="validation"))}
             for r in ("a", "b")}  # fmt: skip
    assert split["a"] == split["b"] == {n for n in names if data.file_split(n, 0.05) == "validation"}
    assert split["a"]  # 120 files at 5%: some land in validation
    (tmp_path / "a" / "extra.py").write_text("y = 1\n")
    assert split["a"] <= {p.relative_to(tmp_path / "a").as_posix()
                          for p in data.files(DataConfig(path=str(tmp_path / "a"), split="validation"))}  # fmt: skip


def test_heldout_package_corpus_is_named_with_its_version():
    import accelerate

    cfg = DataConfig(path="pkg:accelerate", split="all")
    assert data.describe(cfg) == f"pkg:accelerate=={accelerate.__version__}"
    found = data.files(cfg)
    assert len(found) > 20 and all("accelerate" in p.parts for p in found)
    assert not set(found) & set(data.files(DataConfig(path="stdlib", split="all")))
    with pytest.raises(RecipeError, match="no installed package"):
        data.files(DataConfig(path="pkg:no_such_package_xyz"))


def test_eval_source():
    v = data.eval_source(DataConfig(path="stdlib"))
    assert (v.path, v.split) == ("stdlib", "validation")
    other = data.eval_source(DataConfig(path="stdlib", eval_path="pkg:omegaconf"))
    assert (other.path, other.split) == ("pkg:omegaconf", "all")
    with pytest.raises(RecipeError, match="data.eval_path"):
        data.eval_source(DataConfig(path=str(ROOT / "pyproject.toml")))


# ------------------------------------------------------------------------------------------------ tokenizer


CODE = 'def f(x: int) -> str:\n    """Doc — ünïcode ✓."""\n\treturn f"{x!r:>8}"  # tab, emoji 🐍\n'


def test_bpe_round_trips_code_and_keeps_special_tokens():
    from qat.models.bpe import train_bpe
    from qat.models.tiny import SPECIALS

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in data.files(DataConfig(path="stdlib",
                                                                                           max_docs=15))]  # fmt: skip
    tok = train_bpe(texts, vocab_size=600)
    assert len(tok) == 600 and tok.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3]
    for text in [CODE, *texts[:3], "\x00\x7f\r\n  \u00a0"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tok.encode("<|im_start|>user\nx<|mask|><|mask|><|im_end|><|endoftext|>", add_special_tokens=False)
    assert [i for i in ids if i < 4] == [1, 3, 3, 2, 0]
    assert tok.encode("<|ma" + "sk|>", add_special_tokens=False) == tok.encode("<|mask|>", add_special_tokens=False)
    assert 3 not in tok.encode("mask |> <| mask", add_special_tokens=False)  # only the exact string is special
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_tiny_width_recipes_differ_from_their_base_only_in_the_grid(family):
    from dataclasses import asdict

    base = asdict(load_recipe([f"recipe=tiny_{family}"]))
    for b in WIDTHS:
        r = asdict(load_recipe([f"recipe=tiny_{family}_int{b}"]))
        assert r["name"] == f"tiny_{family}_int{b}" and r["quant"]["bits"] == b
        assert {k: v for k, v in r.items() if k not in ("name", "out_dir", "quant")} == {
            k: v for k, v in base.items() if k not in ("name", "out_dir", "quant")}
        diff = {k for k in r["quant"] if r["quant"][k] != base["quant"][k]}
        assert diff <= {"bits", "group_size", "symmetric", "mse"}


def test_coda_width_recipes_share_one_base():
    from dataclasses import asdict

    base = asdict(load_recipe(["recipe=coda"]))
    for b in WIDTHS:
        r = asdict(load_recipe([f"recipe=coda_int{b}"]))
        changed = {f"{s}.{k}" for s in ("model", "quant", "data", "train") for k in r[s] if r[s][k] != base[s][k]}
        assert changed == ({"quant.bits", "train.lr"} if b == 2 else {"quant.bits"} if b != 4 else set())


def test_recipe_inheritance_cycle_and_missing_parent(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe([f"recipe={tmp_path / 'a.yaml'}"])
    (tmp_path / "c.yaml").write_text("extends: no_such_recipe\ntrain:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match="unknown recipe 'no_such_recipe'"):
        load_recipe([f"recipe={tmp_path / 'c.yaml'}"])
    (tmp_path / "d.yaml").write_text("extends: tiny_qwen3_int2\ntrain:\n  lr: 0.1\n")
    r = load_recipe([f"recipe={tmp_path / 'd.yaml'}", "train.steps=7"])
    assert (r.name, r.quant.bits, r.train.lr, r.train.steps) == ("d", 2, 0.1, 7)


# ------------------------------------------------------------------------------------------------ the study


def test_recovery_formula_on_known_numbers():
    from eval.ablate import recovery

    assert recovery(qat=1.30, ptq=1.40, ft=1.20) == pytest.approx(0.5)  # loss: half the gap closed
    assert recovery(qat=1.20, ptq=1.40, ft=1.20) == pytest.approx(1.0)
    assert recovery(qat=1.45, ptq=1.40, ft=1.20) == pytest.approx(-0.25)  # worse than PTQ
    assert recovery(qat=0.45, ptq=0.30, ft=0.50) == pytest.approx(0.75)  # pass rate: higher is better
    assert recovery(qat=1.0, ptq=1.0, ft=1.0) is None


def _row(method, bits, seed=0, **metrics):
    return {"recipe": "r", "family": "qwen3", "cell": f"{method}-{bits}-{seed}", "method": method, "bits": bits,
            "seed": seed, "metric": "heldout", "bytes": 2**20, "latency_ms": 1.0, "latency_range": [0.9, 1.2],
            "latency_step": "decode step, 128-token context", "latency_path": "cpu float32, dense×14", "seconds": 1,
            **metrics}


def test_study_summary_per_metric_best_ptq_on_validation_and_seeds(tmp_path):
    """The best PTQ is chosen on validation (gptq) even where another method is better on held-out (rtn);
    recovery is computed for every metric against that choice, with the mean FT and each QAT seed."""
    from eval.ablate import report, summarize

    rows = [_row("base", 16, validation=2.00, heldout=3.00),
            _row("ft", 16, 0, validation=1.90, heldout=2.90), _row("ft", 16, 1, validation=1.92, heldout=2.92),
            _row("rtn", 2, validation=2.50, heldout=3.20), _row("gptq", 2, validation=2.30, heldout=3.30),
            _row("qat", 2, 0, validation=2.00, heldout=3.00), _row("qat", 2, 1, validation=2.10, heldout=3.10),
            _row("rtn", 8, validation=1.89, heldout=2.89), _row("qat", 8, 0, validation=1.98, heldout=2.98)]
    lines = {(ln["method"], ln["bits"]): ln for ln in summarize(rows)}
    qat2 = lines[("qat", 2)]
    assert qat2["vs"] == "gptq" and qat2["n"] == 2
    v, h = qat2["metrics"]["validation"], qat2["metrics"]["heldout"]
    assert v["mean"] == pytest.approx(2.05) and v["delta"] == pytest.approx(0.05)
    # validation: ptq 2.30, ft 1.91 -> (2.30-2.00)/0.39 and (2.30-2.10)/0.39
    assert v["recovery"]["min"] == pytest.approx(0.20 / 0.39) and v["recovery"]["max"] == pytest.approx(0.30 / 0.39)
    # held-out: ptq (gptq, chosen on validation) 3.30, ft 2.91 -> (0.30, 0.20) / 0.39
    assert h["recovery"]["mean"] == pytest.approx(0.25 / 0.39)
    assert lines[("qat", 8)]["metrics"]["validation"]["recovery"] is None  # PTQ beats FT: no gap
    text = report(rows, tmp_path)
    assert "| qwen3 | qat | 2 |  | 2 |" in text and "gptq" in text and (tmp_path / "pareto.png").stat().st_size > 1000


def test_cells_seed_and_ft_arms():
    from eval.ablate import AblateConfig, cells

    grid = cells(AblateConfig(recipe="tiny_qwen3_int4", seeds=[0, 1], seed_bits=[4, 2]))
    names = [c.name for c in grid]
    assert names[:3] == ["base", "ft-s0", "ft-s1"]
    assert {"qat-w4-s0", "qat-w4-s1", "qat-w2-s1", "qat-w8-s0"} <= set(names) and "qat-w8-s1" not in names
    assert {"qat-gptq-w4-s1", "qat-gptq-w2-s1", "qat-gptq-w3-s0"} <= set(names) and "qat-gptq-w3-s1" not in names
    ft = next(c for c in grid if c.name == "ft-s1")
    assert "train.kd=0" in ft.overrides and "quant.bits=16" in ft.overrides and "train.seed=1" in ft.overrides
    assert len({c.name for c in grid}) == len(grid)


# ------------------------------------------------------------------------------------------------ trainer


@pytest.fixture
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_trainer_validation_start_every_end(tmp_path, capsys, _fresh_accelerate_state):
    from qat import train
    from tests.test_train import scalars

    train.main(["recipe=tiny_coda_int2", f"model.path={ROOT / 'checkpoints/micro-coda'}", "data.max_docs=3",
                "train.seq_len=64", "train.batch_size=2", "train.save_every=0", "train.steps=4", "train.eval_every=2",
                "train.eval_rows=3", f"out_dir={tmp_path}"])  # fmt: skip
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("validation loss")][-1]
    assert "float base" in line and "PTQ rtn W2 (step 0)" in line and "QAT (step 4)" in line
    result = json.loads((tmp_path / "validation.json").read_text())
    assert [s for s, _ in result["curve"]] == [2, 4] and result["windows"] == 3
    assert result["data"].startswith("stdlib") and "validation" in result["data"]
    logged = scalars(tmp_path / "logs")["eval/loss"]
    assert [s for s, _ in logged] == [0, 2, 4] and logged[0][1] == pytest.approx(result["ptq"])
    assert logged[-1][1] == pytest.approx(result["final"])
    # the validation loss is eval.heldout's metric on the same windows
    from qat.models import load
    from qat.objectives import HELDOUT_RATIOS, heldout_loss

    model, tok = load(tmp_path / "final")
    ids = data.windows(data.eval_source(DataConfig()), tok, 64, 3)
    assert heldout_loss(model, ids, "coda", list(HELDOUT_RATIOS), batch_size=2)["loss"] == pytest.approx(
        result["final"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("lean", [False, True])
def test_batched_diffusion_generation_equals_one_at_a_time(lean):
    """Ragged prompts left-padded in one batch give the tokens each prompt gives alone (greedy), also through the
    lean forward (eval.run's default)."""
    from qat.models import load
    from qat.models.sampler import diffusion_generate

    model, tok = load(ROOT / "checkpoints/micro-coda")
    prompts = ["def add(a, b):", "x = 1", "import os\nprint(os.getcwd())  # where"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc.attention_mask.sum(1).tolist())) == 3  # really ragged
    kw = dict(max_new_tokens=12, steps=12, alg="entropy", lean=lean)
    batched = diffusion_generate(model, enc.input_ids, attention_mask=enc.attention_mask, **kw)
    P = enc.input_ids.shape[1]
    for i, p in enumerate(prompts):
        alone = diffusion_generate(model, tok(p, return_tensors="pt", add_special_tokens=False).input_ids, **kw)
        assert torch.equal(batched[i, P:], alone[0, -12:])
    unmasked = diffusion_generate(model, enc.input_ids, **kw)  # the reference attends to padding
    assert not torch.equal(unmasked, batched)


def test_eval_run_coda_results_do_not_depend_on_batch_size(tmp_path):
    from eval.run import main

    paths = [f"paths.humaneval={ROOT.parent / 'shared/data/humaneval/HumanEval.jsonl.gz'}"]
    if not (ROOT.parent / "shared/data/humaneval/HumanEval.jsonl.gz").is_file():
        pytest.skip("needs ../shared/data")
    out = {}
    for bs in (1, 3):
        main([f"checkpoint={ROOT / 'checkpoints/micro-coda'}", *paths, "tasks=[humaneval]", "limit=3",
              "max_new_tokens=8", f"batch_size={bs}", f"out={tmp_path / str(bs)}"])  # fmt: skip
        out[bs] = [json.loads(x)["completion"] for x in (tmp_path / str(bs) / "samples.jsonl").open()]
    assert out[1] == out[3]


def test_learned_scales_stay_positive_and_train_at_their_own_rate(model):
    from qat.config import QuantConfig
    from qat.modules import FakeQuantLinear
    from qat.swap import prepare
    from qat.train import param_groups

    prepare(model, QuantConfig(bits=2, group_size=32, symmetric=False, scales="lsq"))
    fq = next(m for m in model.modules() if isinstance(m, FakeQuantLinear))
    with torch.no_grad():
        fq.weight_quantizer.scale[0, 0] = -0.5  # as a large optimizer step could leave it
    s, _ = fq.weight_quantizer.qparams(fq.weight)
    assert (s > 0).all() and torch.isfinite(fq(torch.randn(2, fq.in_features))).all()
    groups = param_groups(model, 0.1, scales_lr_ratio=0.25)
    quantizer = [g for g in groups if "lr_ratio" in g]
    assert len(quantizer) == 1 and quantizer[0]["lr_ratio"] == 0.25 and quantizer[0]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("weight_quantizer" in names[id(p)] for p in quantizer[0]["params"])
    assert not any("weight_quantizer" in names[id(p)] for g in groups[:2] for p in g["params"])


# ------------------------------------------------------------------------------------------------ the bases

BASES = {"qwen3": ROOT / "checkpoints/tiny-qwen3", "coda": ROOT / "checkpoints/tiny-coda"}


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_committed_base_loads_generates_and_scores_heldout_code(family):
    from qat.models import family_of, load
    from qat.models.sampler import diffusion_generate
    from qat.objectives import HELDOUT_RATIOS, heldout_loss

    path = BASES[family]
    assert family_of(str(path)) == family
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20
    model, tok = load(path)
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 <= n <= 20e6 and len(tok) == model.config.vocab_size == 8192
    assert tok.decode(tok.encode(CODE, add_special_tokens=False)) == CODE
    ids = tok("def fibonacci(n):\n", return_tensors="pt", add_special_tokens=False).input_ids
    if family == "qwen3":
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    else:
        out = diffusion_generate(model, ids, max_new_tokens=16, steps=16, alg="entropy")
    new = out[0, ids.shape[1]:]
    assert len(new) == 16 and (new != getattr(model.config, "mask_token_id", -1)).all()
    assert tok.decode(new).strip()  # real text, not only specials
    heldout = data.windows(DataConfig(path="pkg:accelerate", split="all"), tok, 128, 8)
    loss = heldout_loss(model, heldout, family, list(HELDOUT_RATIOS))["loss"]
    assert torch.isfinite(torch.tensor(loss)) and loss < 6.0  # trained: far below ln(8192) = 9.01


def test_a_tiny_recipe_runs_three_steps_on_the_committed_base(tmp_path, capsys, _fresh_accelerate_state):
    from qat import train
    from qat.models import load

    final = train.main(["recipe=tiny_qwen3_int4", "train.steps=3", "train.eval_rows=4", "train.batch_size=2",
                        "train.save_every=0", "data.max_docs=20", f"out_dir={tmp_path}"])  # fmt: skip
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("validation loss")][-1]
    assert "float base" in line and "(step 0)" in line and "QAT (step 3)" in line
    model, _ = load(final)
    assert model.config.vocab_size == 8192
