"""Recipes: every shipped recipe validates; overrides win; bad input is one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qat.config import RECIPES_DIR, Recipe, RecipeError, flatten, from_yaml, load_recipe, to_yaml
from tests.conftest import ROOT

SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates(name):
    r = load_recipe([f"recipe={name}"])
    assert isinstance(r, Recipe) and r.name == name and r.out_dir == f"checkpoints/{name}"
    assert from_yaml(to_yaml(r)) == r


def test_layers_defaults_recipe_cli():
    r = load_recipe(["recipe=tiny_qwen3_int4", "train.lr=0.5", "quant.skip=[lm_head]", "out_dir=/tmp/x"])
    assert r.train.lr == 0.5 and r.quant.skip == ["lm_head"] and r.out_dir == "/tmp/x"
    assert r.train.batch_size == 8 and r.quant.bits == 4  # from the recipe file and its parent (tiny_qwen3)
    assert r.train.grad_clip == 1.0  # from the defaults
    assert load_recipe([]) == Recipe(out_dir="checkpoints/default")  # interpolations resolved
    assert flatten(r)["quant.skip"] == "['lm_head']" and flatten(r)["train.lr"] == 0.5


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train.lrr=1"], "lrr"),
        (["quant.bits=four"], "four"),
        (["quant.bits=5"], "quant.bits must be one of 2, 3, 4, 8, 16"),
        (["recipe=nope"], "unknown recipe 'nope'"),
        (["train.steps"], "key=value"),
        (["quant.scales=learned"], "quant.scales"),
        (["quant.init=gptq", "quant.scales=dynamic"], "discard the PTQ solution"),
        (["quant.bits=3.5", "quant.mixed_choices=[3]"], "mixed precision"),
        (["quant.calib_mask=always"], "calib_mask"),
        (["train.kd=2"], "train.kd must be in"),
    ],
)
def test_bad_input_is_a_recipe_error(argv, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(argv)


def run_cli(*args: str, entry: tuple[str, ...] = ("qat/train.py",)) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *entry, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


TRAIN, RUN, HELDOUT, ABLATE = ("qat/train.py",), ("-m", "eval.run"), ("-m", "eval.heldout"), ("-m", "eval.ablate")
MICRO = "checkpoints/micro-qwen3"


@pytest.mark.parametrize(
    "entry,args,match",
    [
        (TRAIN, ["recipe=nope"], "unknown recipe"),
        (TRAIN, ["recipe=tiny_qwen3_int4", "train.lrr=1"], "lrr"),
        (TRAIN, ["recipe=tiny_qwen3_int4", "quant.bits=5"], "quant.bits"),
        (TRAIN, ["recipe=tiny_qwen3_int4", "model.path=/no/such/model"], "model.path=/no/such/model"),
        (TRAIN, ["recipe=micro_qwen3_int4", "quant.skip=[*embed*]"], "quote values"),  # a YAML alias, unquoted
        (TRAIN, ["recipe=micro_qwen3_int4", "quant.group_size=7", "train.steps=0"], "does not divide"),
        (TRAIN, ["recipe=micro_qwen3_int4", "quant.group_size=7", "quant.init=gptq", "train.steps=0"],
         "does not divide"),
        (RUN, ["checkpoint=/nonexistent"], "checkpoint=/nonexistent: no such directory"),
        (RUN, [f"checkpoint={MICRO}", "tasks=[nosuch]"], "unknown tasks ['nosuch']"),
        (RUN, [f"checkpoint={MICRO}", "n=0"], "n must be >= 1"),
        (HELDOUT, [f"checkpoint={MICRO}", "max_rows=0"], "max_rows must be >= 1"),
        (HELDOUT, ["checkpoint=/nonexistent"], "no such directory"),
        (HELDOUT, [f"checkpoint={MICRO}", "data=/no/such/corpus"], "/no/such/corpus"),
        (ABLATE, ["recipe=nope"], "unknown recipe"),
        (ABLATE, ["recipe=micro_qwen3_int4", "methods=[qlora]"], "unknown methods"),
        (ABLATE, ["recipe=micro_qwen3_int4", "bits=[5]"], "bits must be"),
        (RUN, [f"checkpoint={MICRO}", "limit=-1"], "limit must be >= 0"),
        (("-m", "qat.models.bpe"), ["out=/nonexistent/bpe", "vocab_size=0"], "vocab_size must be"),
        (("-m", "qat.models.bases"), ["publish", "src=/nonexistent", "out=/nonexistent/x"], "src=/nonexistent"),
    ],
)  # fmt: skip
def test_cli_errors_exit_2_with_one_line(entry, args, match, tmp_path):
    out = [f"out_dir={tmp_path}"] if entry == TRAIN else []
    p = run_cli(*args, *out, entry=entry)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], errors


def test_mixed_precision_no_on_the_command_line():
    assert load_recipe(["recipe=micro_qwen3_int4", "train.mixed_precision=no"]).train.mixed_precision == "no"
