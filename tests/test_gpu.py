"""The GPU lane: what only a GPU can check. `python -m pytest -m gpu` on a machine with CUDA; skipped without one.

bf16 mixed precision through the trainer, flash-attention against SDPA (when flash-attn is installed), the
integer model on the GPU against the fake-quant model, a DeepSpeed and an FSDP2 step through accelerate's GPU
path, and a short real QAT run that must beat its PTQ start. Whoever runs it records what it showed in LOG.md.

QAT_GPU_LANE_DEVICE=cpu runs the same tests on CPU (flash-attention excepted): a check of the lane's own logic
on machines without a GPU, not a substitute for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qat import train
from qat.config import QuantConfig
from qat.models import load
from qat.modules import FakeQuantLinear, QuantizedLinear
from qat.swap import convert, prepare
from tests.conftest import ROOT
from tests.test_train import TINY, free_port, scalars

DEVICE = os.environ.get("QAT_GPU_LANE_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="no CUDA device (the GPU lane)")]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_bf16_mixed_precision_training(tmp_path):
    final = train.main([*TINY, "train.steps=4", "train.mixed_precision=bf16", "train.eval_every=4",
                        "train.kd=0.5", "quant.scales=lsq", f"out_dir={tmp_path}"])  # fmt: skip
    losses = [v for _, v in scalars(tmp_path / "logs")["train/loss"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    val = json.loads((tmp_path / "validation.json").read_text())
    assert torch.isfinite(torch.tensor(val["final"]))
    model, _ = load(final)
    ids = torch.randint(0, 200, (2, 32), device=DEVICE)
    with torch.no_grad():
        assert torch.isfinite(model.to(DEVICE)(input_ids=ids).logits).all()


@pytest.mark.parametrize("name", ["micro-qwen3", "micro-coda"])
def test_flash_attention_matches_sdpa(name):
    pytest.importorskip("flash_attn")
    if DEVICE != "cuda":
        pytest.skip("flash-attention needs CUDA")
    ids = torch.randint(0, 200, (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    logits = {}
    for attn in ("sdpa", "flash_attention_2"):
        model, _ = load(ROOT / "checkpoints" / name, dtype="bfloat16", attn=attn)
        with torch.no_grad():
            logits[attn] = model.to("cuda")(input_ids=ids).logits.float()
    a, b = logits["sdpa"], logits["flash_attention_2"]
    assert (a - b).norm() <= 2e-2 * a.norm()  # bf16 kernels: the same attention up to rounding
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False), (3, False), (2, False)])
def test_integer_model_on_gpu_computes_the_fake_quant_model(bits, symmetric):
    """Whatever path each QuantizedLinear picks on the GPU (the CUDA int4 kernel is not wired: the dense weight
    then), the converted model computes what the fake-quant model computed, in bf16."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    fq = FakeQuantLinear.from_linear(lin, QuantConfig(bits=bits, group_size=64, symmetric=symmetric))
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = fq.to(DEVICE)(x.to(DEVICE))
        q = QuantizedLinear.from_fake_quant(fq)
        got = q.to(DEVICE)(x.to(DEVICE))
    assert got.device.type == DEVICE and got.dtype == torch.bfloat16
    assert (got.float() - want.float()).norm() <= 1e-2 * want.float().norm(), q.path


def test_converted_tiny_model_generates_on_gpu():
    model, tok = load(ROOT / "checkpoints" / "micro-qwen3")
    prepare(model, QuantConfig(bits=4, group_size=64))
    model = convert(model).to(DEVICE)
    ids = torch.tensor([tok.encode("def add(a, b):")], device=DEVICE)
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)


@pytest.mark.parametrize("config", ["zero2", "fsdp"])
def test_engine_step(tmp_path, config):
    n = max(1, min(2, torch.cuda.device_count())) if DEVICE == "cuda" else 2
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/{config}.yaml",
           "--num_processes", str(n), "--main_process_port", str(free_port()), "qat/train.py", *TINY,
           "train.steps=3", "train.kd=0.5", "train.kd_teacher=frozen", "quant.scales=lsq", f"out_dir={tmp_path}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    kind = "DEEPSPEED" if config == "zero2" else "FSDP"
    assert f"processes: {n} ({kind})" in p.stdout, p.stdout[-2000:]
    model, _ = load(tmp_path / "final")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


def test_short_qat_run_beats_its_ptq_start(tmp_path):
    """The trained tiny Qwen3 at W2 (GPTQ start, the recipe's learned scales and distillation): 40 steps of QAT
    lower the validation loss below the PTQ model's."""
    train.main(["recipe=tiny_qwen3_int2", "quant.init=gptq", "train.steps=40", "train.eval_every=40",
                "train.save_every=0", "train.warmup=4", f"out_dir={tmp_path}"])  # fmt: skip
    val = json.loads((tmp_path / "validation.json").read_text())
    assert val["final"] < val["ptq"], val
