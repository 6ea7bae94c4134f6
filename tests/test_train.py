"""The trainer end to end on the tiny recipe: artifact, TensorBoard, bitwise resume, PTQ, failure modes, launchers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qat import train
from qat.config import QuantConfig
from qat.models import load
from qat.modules import QuantizedLinear
from qat.swap import prepare
from tests.conftest import ROOT

TINY = ["recipe=micro_qwen3_int4", f"model.path={ROOT / 'checkpoints/micro-qwen3'}", "data.max_docs=3",
        "train.seq_len=64", "train.batch_size=2", "train.save_every=0"]  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(tmp: Path, *extra: str) -> Path:
    return train.main([*TINY, f"out_dir={tmp}", *extra])


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir / "tb"), size_guidance={"scalars": 0})  # the trainer's tracker: "tb"
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_three_steps_artifact_and_tensorboard(tmp_path, ids):
    final = run(tmp_path, "train.steps=3")
    assert final == tmp_path / "final" and (tmp_path / "recipe.yaml").is_file() and (final / "recipe.yaml").is_file()
    model, tok = load(final)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    assert tok.decode(tok.encode("def f(): pass")) == "def f(): pass"
    assert torch.isfinite(model(input_ids=ids).logits).all()

    tags = scalars(tmp_path / "logs")
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "quant/rel_error",
        "quant/flip_fraction",
    ]:
        assert tag in tags, tag
    assert [s for s, _ in tags["train/loss"]] == [1, 2, 3]
    assert [s for s, _ in tags["quant/flip_fraction"]] == [2, 3]  # needs a previous log to compare with


def test_stop_and_resume_equals_straight_run_bitwise(tmp_path):
    common = [
        "train.steps=4",
        "train.grad_accum=2",
        "train.kd=0.5",
        "quant.scales=lsq",
        "quant.symmetric=false",
    ]
    straight = run(tmp_path / "a", *common)
    assert run(tmp_path / "b", *common, "train.stop_after=2") == tmp_path / "b" / "final"
    assert not (tmp_path / "b" / "final").exists()
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_00000002"]
    resumed = run(tmp_path / "b", *common, "train.resume=auto")
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("qweight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tags = scalars(tmp_path / "b" / "logs")
    assert {"train/ce_loss", "train/kd_loss"} <= tags.keys()


def test_steps0_is_the_ptq_model(tmp_path, ids):
    final = run(tmp_path, "train.steps=0", "quant.bits=3", "quant.group_size=-1")
    base, _ = load(ROOT / "checkpoints/micro-qwen3")
    prepare(base, QuantConfig(bits=3, group_size=-1))
    ptq, _ = load(final)
    with torch.no_grad():
        assert torch.equal(ptq(input_ids=ids).logits, base(input_ids=ids).logits)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(
            tmp_path,
            "train.steps=6",
            "train.lr=1e30",
            "train.warmup=0",
            "train.grad_clip=0",
            "train.save_every=1",
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: loss is nan" in err or "error: loss is inf" in err
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept and f"Last good checkpoint: {tmp_path / 'checkpoints' / kept[-1]}" in err
    assert not (tmp_path / "final").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, *launch_args: str, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()
           ) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port", str(free_port()),
           "qat/train.py", *TINY, "train.steps=3", f"out_dir={tmp}", *extra]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert (tmp / "final" / "model.safetensors").is_file()
    return p


@pytest.mark.slow
def test_accelerate_launch_one_process(tmp_path):
    launch(
        tmp_path,
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    )
    load(tmp_path / "final")


@pytest.mark.slow
def test_accelerate_launch_ddp_two_processes(tmp_path):
    p = launch(
        tmp_path,
        "--config_file",
        "launch/ddp.yaml",
        "--num_processes",
        "2",
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert "2 processes" in p.stdout or "processes: 2" in p.stdout, p.stdout[-2000:]


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(tmp_path):
    p = launch(tmp_path, "--config_file", "launch/zero2.yaml", "--num_processes", "2")
    assert "processes: 2" in p.stdout, p.stdout[-2000:]


NAN_AT_STEP = """
import math, sys
import torch
from accelerate import Accelerator
from qat import train

calls, backward = {"n": 0}, Accelerator.backward
real = train.compute_loss


def compute_loss(*args, **kwargs):  # the loss of rank 1's third micro-batch is NaN
    loss, parts = real(*args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 3 and args[1].device.type == "cpu" and int(__import__("os").environ.get("RANK", "0")) == 1:
        loss = loss * float("nan")
    return loss, parts


def checked_backward(self, loss, **kwargs):
    if not math.isfinite(float(loss.detach())):
        print("BACKWARD OF A NON-FINITE LOSS", flush=True)
    return backward(self, loss, **kwargs)


train.compute_loss, Accelerator.backward = compute_loss, checked_backward
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_deepspeed_nonfinite_loss_stops_before_the_engine_steps(tmp_path):
    """Under DeepSpeed the engine steps inside backward: a NaN on one rank must stop every rank before it."""
    script = tmp_path / "nan_at_step.py"
    script.write_text(NAN_AT_STEP)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/zero2.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), str(script), *TINY, "train.steps=5",
           "train.save_every=1", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert p.returncode != 0, p.stdout[-2000:]
    out = p.stdout + p.stderr
    assert "loss is nan at step 2; stopped before the update" in out, out[-3000:]
    assert "Last good checkpoint:" in out and "step_00000002" in out
    assert "BACKWARD OF A NON-FINITE LOSS" not in out
    assert sorted(c.name for c in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "step_00000002"
    assert not (tmp_path / "run" / "final").exists()


def test_resume_skip_divides_the_global_position():
    assert train.resume_skip(8, 2) == (4, 0) and train.resume_skip(8, 1) == (8, 0)  # 2 ranks → 1: the same order
    assert train.resume_skip(8, 3) == (2, 2)  # 3 ranks: 6 batches skipped, 2 left out (never seen twice)
    assert train.resume_skip(0, 4) == (0, 0)


def launch_any(tmp: Path, config: str, n: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(n),
           "--main_process_port", str(free_port()), "qat/train.py", *TINY, "train.steps=4", "train.save_every=1",
           f"out_dir={tmp}", *extra]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"} if "ddp" in config else dict(os.environ)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_resume_on_another_number_of_processes(tmp_path):
    """A DDP run stopped at step 2 on 2 processes continues on 1: the global data position (4 micro-batches of
    2 sequences) carries over, the run ends, and the artifact loads."""
    first = launch_any(tmp_path, "launch/ddp.yaml", 2, "train.stop_after=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train.main([*TINY, "train.steps=4", "train.save_every=1", f"out_dir={tmp_path}", "train.resume=auto"])
    assert second == tmp_path / "final"
    import torch as _t

    state = _t.load(tmp_path / "checkpoints" / "step_00000004" / train.CUSTOM_STATE, weights_only=True)
    assert state == {"step": 4, "batches": 2 * 2 + 2 * 1, "world": 1}  # 2 steps × 2 ranks, then 2 steps × 1
    load(second)


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a nested checkpoint object, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The tensors of one saved object: a torch.save file, or a torch.distributed.checkpoint directory (FSDP)."""
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, tmp / "converted.pt")
        path = tmp / "converted.pt"
    return _tensors(torch.load(path, map_location="cpu", weights_only=False))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_process_stop_and_resume_equals_straight_run_bitwise(tmp_path, config):
    """2 processes: stopping at step 2 and resuming reaches the straight run's weights and optimizer state, bit
    for bit, under DDP and DeepSpeed ZeRO-2/3."""
    common = ("train.save_every=2", "train.kd=0.5", "quant.scales=lsq")
    straight = launch_any(tmp_path / "a", f"launch/{config}.yaml", 2, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for extra in ("train.stop_after=2", "train.resume=auto"):
        p = launch_any(tmp_path / "b", f"launch/{config}.yaml", 2, *common, extra)
        assert p.returncode == 0, p.stderr[-3000:]
        assert (tmp_path / "b" / "final").exists() == (extra == "train.resume=auto")
    assert "at step 2" in p.stdout and "resumed from" in p.stdout, p.stdout[-2000:]  # it did resume
    a, b = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = {r: tmp_path / r / "checkpoints" / "step_00000004" for r in ("a", "b")}
    files = sorted(str(f.relative_to(ckpt["a"])) for f in ckpt["a"].glob("**/*optim*"))
    assert files, list(ckpt["a"].rglob("*"))
    for f in files:  # the optimizer state (DeepSpeed: each rank's partition; FSDP: a sharded checkpoint)
        sa, sb = (_checkpoint_tensors(ckpt[r] / f, tmp_path / r) for r in ("a", "b"))
        assert sa.keys() == sb.keys() and sa and all(torch.equal(sa[k], sb[k]) for k in sa), f


# Learned scales, a frozen teacher, validation: a second model, and parameters read outside the training forward.
ENGINE_EXTRA = ("train.kd=0.5", "train.kd_teacher=frozen", "quant.scales=lsq", "train.eval_every=2")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The reference for the engines: one process, the same global batch (4 sequences) as 2 processes × 2."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("one")
    train.main([*TINY, "train.steps=4", "train.save_every=1", "train.batch_size=4", f"out_dir={out}", *ENGINE_EXTRA])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_processes_train_like_one_process(tmp_path, config, one_process_run):
    """2 processes × 2 sequences reach what 1 process × 4 reaches: the same losses step by step, the same
    validation, the same artifact up to float reassociation (codes may flip only at rounding boundaries)."""
    p = launch_any(tmp_path, f"launch/{config}.yaml", 2, *ENGINE_EXTRA)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    mine, total = (float(x) for x in p.stdout.split("teacher: frozen, ")[1].split("M parameters")[0].split("M of its "))
    assert (mine < 0.6 * total) == (config in ("zero3", "fsdp")), (mine, total)  # the teacher is sharded
    ref, got = (scalars(d / "logs")["train/loss"] for d in (one_process_run, tmp_path))
    assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-4)
    import json

    vr, vg = (json.loads((d / "validation.json").read_text()) for d in (one_process_run, tmp_path))
    assert [s for s, _ in vg["curve"]] == [s for s, _ in vr["curve"]] == [2, 4]
    assert [v for _, v in vg["curve"]] == pytest.approx([v for _, v in vr["curve"]], rel=1e-4)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (one_process_run, tmp_path))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("qweight"):
            assert (a[k] == b[k]).float().mean() > 0.999, k
        else:
            assert (a[k].float() - b[k].float()).norm() <= 1e-3 * a[k].float().norm(), k


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_delayed_fake_quant_under_sharding(tmp_path, config):
    """Fake quant switching on at step 1: the grids are re-derived from gathered weights and written back into
    the shards (FSDP: the same losses as one process), and ZeRO-3's traced fetch order survives the learned
    scales joining the forward (it used to stop with "tracing error")."""
    extra = ("quant.scales=lsq", "train.fake_quant_after=1")
    p = launch_any(tmp_path / "two", f"launch/{config}.yaml", 2, *extra)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "step 1: fake quant on; 14 grids re-derived" in p.stdout, p.stdout[-2000:]
    if config == "fsdp":  # DeepSpeed's flat Adam also steps the scales at step 0 (zero gradients): another path
        one = train.main([*TINY, "train.steps=4", "train.save_every=0", "train.batch_size=4",
                          f"out_dir={tmp_path / 'one'}", *extra])  # fmt: skip
        ref, got = (scalars(d / "logs")["train/loss"] for d in (one.parent, tmp_path / "two"))
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], rel=1e-4)


@pytest.mark.slow
def test_fsdp_shards_weights_and_learned_scales(tmp_path):
    """Under FSDP2 every parameter, the quantizers' learned scales included, is saved by both processes, each
    its own half (the checkpoint's chunks), and the final artifact still holds full tensors."""
    from torch.distributed.checkpoint import FileSystemReader

    p = launch_any(tmp_path, "launch/fsdp.yaml", 2, "quant.scales=lsq", "quant.symmetric=false")
    assert p.returncode == 0 and "processes: 2 (FSDP)" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    meta = FileSystemReader(str(tmp_path / "checkpoints" / "step_00000004" / "pytorch_model_fsdp_0")).read_metadata()
    tensors = {k: v for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks")}
    scales = [k for k in tensors if k.endswith(("weight_quantizer.scale", "weight_quantizer.zero_point"))]
    assert len(scales) == 28, sorted(tensors)
    for k in scales + [k for k in tensors if k.endswith("proj.weight")]:
        chunks = tensors[k].chunks
        assert len(chunks) == 2 and sum(c.sizes[0] for c in chunks) == tensors[k].size[0], k
    model, _ = load(tmp_path / "final")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


@pytest.mark.slow
def test_fsdp_resumes_on_another_number_of_processes(tmp_path):
    """FSDP's sharded checkpoint is re-sharded on load: the step-2 state of a 2-process run, loaded by 3 processes,
    gives the artifact 2 processes give (train.steps=2: nothing left to train). One process cannot load it."""
    first = launch_any(tmp_path / "run", "launch/fsdp.yaml", 2, "quant.scales=lsq", "train.stop_after=2")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    for n in (2, 3):
        p = launch_any(tmp_path / str(n), "launch/fsdp.yaml", n, "quant.scales=lsq", f"train.resume={ckpt}",
                       "train.steps=2")  # fmt: skip
        assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
        assert (f"(written by 2 processes, now {n})" in p.stdout) == (n != 2), p.stdout[-2000:]
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("2", "3"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "1", "train.steps=4", "quant.scales=lsq", f"train.resume={ckpt}")
    assert e.value.code == 2


@pytest.mark.slow
def test_deepspeed_refuses_to_resume_on_another_number_of_processes(tmp_path):
    first = launch_any(tmp_path, "launch/zero2.yaml", 2, "train.stop_after=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch_any(tmp_path, "launch/zero2.yaml", 1, "train.resume=auto")
    assert second.returncode != 0  # the trainer exits 2; the launcher reports any child failure as 1
    assert "exitcode  : 2" in second.stderr, second.stderr[-3000:]
    assert "written by 2 DeepSpeed processes" in second.stderr and "resume with 2 processes" in second.stderr


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_launch_configs_validate(name):
    """Each shipped DeepSpeed launch config becomes a valid DeepSpeed config (no processes needed)."""
    import yaml
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = yaml.safe_load((ROOT / "launch" / f"{name}.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED"
    ds = cfg["deepspeed_config"]
    plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], zero3_init_flag=ds["zero3_init_flag"],
                             zero3_save_16bit_model=ds.get("zero3_save_16bit_model", False))  # fmt: skip
    concrete = {**plugin.deepspeed_config, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "train_batch_size": 2, "gradient_clipping": 1.0}  # fmt: skip
    concrete.pop("bf16", None), concrete.pop("fp16", None)
    parsed = DeepSpeedConfig(concrete)
    assert parsed.zero_optimization_stage == ds["zero_stage"]


@pytest.mark.slow
def test_deepspeed_zero3_two_processes(tmp_path):
    """ZeRO-3 partitions at load time: prepare runs on gathered weights, the artifact from a gathered state dict."""
    p = launch(tmp_path, "--config_file", "launch/zero3.yaml", "--num_processes", "2")
    assert "processes: 2" in p.stdout, p.stdout[-2000:]
    model, _ = load(tmp_path / "final")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


@pytest.mark.slow
def test_deepspeed_zero3_gptq_ptq_equals_one_process(tmp_path):
    """GPTQ rewrites weights that ZeRO-3 has partitioned: the changes must survive the gather, so the PTQ
    artifact of a 2-rank ZeRO-3 run equals the single-process one, bit for bit."""
    extra = ("train.steps=0", "quant.init=gptq", "quant.bits=3", "quant.calib_samples=4", "quant.calib_seq_len=64")
    launch(tmp_path / "z3", "--config_file", "launch/zero3.yaml", "--num_processes", "2", extra=extra)
    one = run(tmp_path / "one", "train.steps=3", *extra)
    a, b = load_file(one / "model.safetensors"), load_file(tmp_path / "z3" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_delayed_fake_quant_and_frozen_teacher(tmp_path):
    run(tmp_path, "train.steps=3", "train.fake_quant_after=2", "train.kd=0.3", "train.kd_teacher=frozen",
        "train.kd_hidden=1")  # fmt: skip
    tags = scalars(tmp_path / "logs")
    assert [v for _, v in tags["train/fake_quant"]] == [0.0, 0.0, 1.0]
    assert tags["train/kd_loss"][0][1] == pytest.approx(0.0, abs=1e-6)  # float student = frozen float teacher at step 0
    hidden = [v for _, v in tags["train/hidden_loss"]]
    assert hidden[0] == pytest.approx(0.0, abs=1e-6) and hidden[2] > 0  # layers differ once fake quant is on


@pytest.mark.parametrize("family", ["qwen3", "coda"])
def test_teacher_cache_trains_bit_for_bit_like_the_teacher(tmp_path, family, capsys):
    """train.teacher_cache: a first run (every batch computed and kept) and a second one (every batch read back)
    end with the weights of a run without the cache, bit for bit; for CoDA the noised inputs are the keys."""
    extra = ["train.steps=3", "train.kd=0.7", "train.kd_teacher=frozen", "quant.init=gptq", "quant.calib_samples=4",
             "quant.calib_seq_len=64"]  # fmt: skip
    if family == "coda":
        extra += ["model.family=coda", f"model.path={ROOT / 'checkpoints/micro-coda'}"]
    plain = load_file(run(tmp_path / "plain", *extra) / "model.safetensors")
    for name, says in (("first", "0 batches read"), ("second", "3 batches read")):
        final = run(tmp_path / name, *extra, f"train.teacher_cache={tmp_path / 'cache'}")
        assert f"train.teacher_cache: {says}" in capsys.readouterr().out
        got = load_file(final / "model.safetensors")
        assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain), name
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_delayed_fake_quant_rederives_the_grids(tmp_path, monkeypatch):
    """When fake quant switches on after float steps, every grid is fitted anew to the weights as they are then
    (the grid of the starting weights no longer fits them), once, at that step."""
    from qat import quant, swap

    calls = []

    def spy(model):
        fqs = [m for _, m in swap.fake_quant_modules(model)]
        fitted = [quant.rtn_qparams(m.weight, 4, m.weight_quantizer.n_groups, m.weight_quantizer.symmetric)[0]
                  for m in fqs]  # fmt: skip
        stale = sum(not torch.equal(m.weight_quantizer.scale, s) for m, s in zip(fqs, fitted, strict=True))
        n = swap.rederive_scales(model)
        fits = all(torch.equal(m.weight_quantizer.scale, s) for m, s in zip(fqs, fitted, strict=True))
        calls.append((n, stale, fits))
        return n

    monkeypatch.setattr(train, "rederive_scales", spy)
    run(tmp_path, "train.steps=3", "train.fake_quant_after=2", "train.lr=1e-2", "train.warmup=0")
    assert len(calls) == 1
    n, stale, fitted = calls[0]
    assert n == 14 and stale > 0 and fitted  # the float steps moved the weights; the grids now fit them


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    real, calls = train.compute_loss, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # during step 3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "compute_loss", interrupted)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "train.steps=5")
    assert e.value.code == 130
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]


TINY_CODA = ["recipe=micro_coda_int4", f"model.path={ROOT / 'checkpoints/micro-coda'}", "data.max_docs=3",
             "train.seq_len=64", "train.batch_size=2", "train.save_every=0"]  # fmt: skip


def test_coda_three_steps_artifact_reloads_and_samples(tmp_path):
    from qat.models.coda import CoDAForMaskedDiffusion
    from qat.models.sampler import diffusion_generate

    final = train.main([*TINY_CODA, f"out_dir={tmp_path}", "train.steps=3", "train.kd=0.5"])
    model, tok = load(final)
    assert isinstance(model, CoDAForMaskedDiffusion)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    prompt = torch.tensor([tok.encode("def add(a, b):")])
    out = diffusion_generate(model, prompt, max_new_tokens=8, steps=8, alg="entropy")
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out[:, : prompt.shape[1]], prompt)
    assert not (out == model.config.mask_token_id).any()
    assert {"train/ce_loss", "train/kd_loss"} <= scalars(tmp_path / "logs").keys()


def test_coda_resume_reproduces_the_noise(tmp_path):
    """The masking noise is a function of (seed, rank, step, micro-batch): stop + resume = a straight run, bitwise."""
    common = [*TINY_CODA, "train.steps=4", "train.grad_accum=2", "diffusion.block_prob=0.5"]
    straight = train.main([*common, f"out_dir={tmp_path / 'a'}"])
    train.main([*common, f"out_dir={tmp_path / 'b'}", "train.stop_after=2"])
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = train.main([*common, f"out_dir={tmp_path / 'b'}", "train.resume=auto"])
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_coda_chat_sft_data(tmp_path):
    import json

    rows = [{"instruction": f"Write f{i}.", "output": f"def f{i}():\n    return {i}\n"} for i in range(6)]
    rows.append({"instruction": "long " * 200, "output": "x"})  # over seq_len: dropped
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main([*TINY_CODA, f"out_dir={tmp_path / 'out'}", "train.steps=2", f"data.path={path}", "data.format=chat",
                "train.seq_len=96"])  # fmt: skip
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
