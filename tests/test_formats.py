"""Export to compressed-tensors pack-quantized and GPTQ v1 (qat/formats/): plain transformers + compressed-tensors
loads our symmetric exports and computes our logits; our reader reads every export back; the GPTQ layout is
checked against its description by an independent decoder; what a format cannot hold is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qat import export, train
from qat.formats import pack_rows, unpack_rows
from qat.models import load
from qat.modules import QuantizedLinear
from tests.conftest import ROOT
from tests.test_ptq import CALIB, FAMILIES, ids


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def artifact(tmp_path, family: str, *extra: str):
    return train.main([*FAMILIES[family], *CALIB, f"out_dir={tmp_path / 'run'}", "train.steps=0", *extra])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [32, 40, 96])
def test_dense_packing_round_trips_and_matches_compressed_tensors(bits, n):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    u = torch.randint(0, 1 << bits, (3, n), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_rows(u, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-n * bits // 32))
    assert torch.equal(unpack_rows(packed, bits, n), u)
    signed = (u - (1 << (bits - 1))).to(torch.int8)  # the library packs signed codes, offset to unsigned
    assert torch.equal(packed, pack_to_int32(signed, bits))


@pytest.mark.parametrize("extra", [["quant.bits=8", "quant.group_size=-1"], ["quant.bits=4", "quant.group_size=32"],
                                   ["quant.bits=3", "quant.group_size=32"], ["quant.bits=2", "quant.group_size=-1"]],
                         ids=["w8-channel", "w4-g32", "w3-g32", "w2-channel"])  # fmt: skip
def test_transformers_loads_compressed_tensors_export_with_our_logits(tmp_path, extra):
    from transformers import AutoModelForCausalLM

    final = artifact(tmp_path, "qwen3", *extra)
    ours, _ = load(final)
    out = export.export(final, "compressed-tensors", tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(isinstance(m, QuantizedLinear) for m in hf.modules())  # transformers' own modules
    assert torch.equal(logits(hf), logits(ours))


@pytest.mark.parametrize("family", ["qwen3", "coda"])
@pytest.mark.parametrize("extra", [["quant.bits=4", "quant.group_size=32", "quant.symmetric=false"],
                                   ["quant.bits=3.5", "quant.mixed_choices=[2,4]", "quant.group_size=32",
                                    "quant.symmetric=false"]], ids=["w4-asym", "mixed-asym"])  # fmt: skip
def test_our_reader_reads_compressed_tensors_exactly(tmp_path, family, extra):
    """Asymmetric grids and per-layer settings (mixed precision), both families. transformers with
    compressed-tensors 0.20.1 cannot load asymmetric pack-quantized checkpoints at all (its empty model expects
    unpacked zero points: upstream llm-compressor#1618), so our reader is the check here."""
    final = artifact(tmp_path, family, *extra)
    ours, _ = load(final)
    out = export.export(final, "compressed-tensors", tmp_path / "ct")
    back, _ = load(out)
    assert torch.equal(logits(back), logits(ours))
    bits = {n: m.bits for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    assert bits == {n: m.bits for n, m in back.named_modules() if isinstance(m, QuantizedLinear)}
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == len(set(bits.values()))  # one config group per setting


def _decode_gptq(tensors: dict, name: str, bits: int, n_in: int) -> torch.Tensor:
    """The dequantized weight [out, in] from raw GPTQ v1 tensors, following the format's description word by
    word (an independent decoder: no code shared with the exporter)."""
    qweight, qzeros = tensors[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF, tensors[f"{name}.qzeros"]
    per_word, mask = 32 // bits, (1 << bits) - 1
    q = torch.stack([(qweight >> (bits * j)) & mask for j in range(per_word)], 1).reshape(n_in, -1)  # [in, out]
    zw = qzeros.to(torch.int64) & 0xFFFFFFFF
    z = torch.stack([(zw >> (bits * j)) & mask for j in range(per_word)], 2).reshape(zw.shape[0], -1) + 1  # [G, out]
    g_idx = tensors[f"{name}.g_idx"].long()
    s = tensors[f"{name}.scales"].float()
    return ((q - z[g_idx]) * s[g_idx]).t()


@pytest.mark.parametrize("family", ["qwen3", "coda"])
@pytest.mark.parametrize("extra", [["quant.bits=4", "quant.group_size=32"], ["quant.bits=8", "quant.group_size=-1"]],
                         ids=["w4-g32", "w8-channel"])  # fmt: skip
def test_gptq_export_follows_the_layout_and_reads_back(tmp_path, family, extra):
    final = artifact(tmp_path, family, *extra)
    ours, _ = load(final)
    out = export.main([f"checkpoint={final}", "format=gptq", f"out={tmp_path / 'gptq'}"])
    cfg = json.loads((out / "quantize_config.json").read_text())
    assert cfg == json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["sym"] and not cfg["desc_act"] and cfg["checkpoint_format"] == "gptq"
    tensors = load_file(str(out / "model.safetensors"))
    for name, m in ours.named_modules():
        if isinstance(m, QuantizedLinear):
            n_groups = m.scale.shape[1]
            assert tensors[f"{name}.qweight"].shape == (m.in_features * m.bits // 32, m.out_features)
            assert tensors[f"{name}.qzeros"].shape == (n_groups, m.out_features * m.bits // 32)
            assert tensors[f"{name}.scales"].dtype == torch.float16
            expected = (m.codes().float() * m.scale.half().float().repeat_interleave(m.in_features // n_groups, 1))
            assert torch.equal(_decode_gptq(tensors, name, m.bits, m.in_features), expected)
            m.scale = m.scale.half().float()  # the one thing the format rounds: scales to float16
    back, _ = load(out)
    assert torch.equal(logits(back), logits(ours))


def test_gptq_mixed_precision_writes_dynamic_overrides(tmp_path):
    final = artifact(tmp_path, "qwen3", "quant.bits=3.5", "quant.mixed_choices=[2,4]", "quant.group_size=32")
    ours, _ = load(final)
    out = export.export(final, "gptq", tmp_path / "gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    bits = {n: m.bits for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(bits.values()) == {2, 4} and len(cfg["dynamic"]) == sum(b != cfg["bits"] for b in bits.values())
    back, _ = load(out)
    assert bits == {n: m.bits for n, m in back.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("extra,match", [
    (["quant.bits=4", "quant.group_size=32", "quant.symmetric=false"], "symmetric"),
    (["quant.bits=3", "quant.group_size=32"], "3-bit"),
])  # fmt: skip
def test_gptq_refuses_what_v1_cannot_hold(tmp_path, extra, match):
    final = artifact(tmp_path, "qwen3", *extra)
    with pytest.raises(ValueError, match=match):
        export.export(final, "gptq", tmp_path / "gptq")


def test_a_float_artifact_is_refused(tmp_path):
    from qat.config import RecipeError

    final = artifact(tmp_path, "qwen3", "quant.bits=16")
    with pytest.raises(RecipeError, match="nothing to export"):
        export.export(final, "compressed-tensors", tmp_path / "ct")


def test_an_off_grid_zero_point_is_refused(tmp_path):
    final = artifact(tmp_path, "qwen3", "quant.bits=4", "quant.group_size=32", "quant.symmetric=false")
    model, tok = load(final)
    next(m for m in model.modules() if isinstance(m, QuantizedLinear)).zero_point[0, 0] = 16.0
    from qat.formats import ct

    with pytest.raises(ValueError, match="zero point"):
        ct.export(model, tok, tmp_path / "ct")


@pytest.mark.parametrize("args,match", [
    ([f"checkpoint={ROOT / 'checkpoints/micro-qwen3'}", "format=onnx", "out=/tmp/x"], "format must be one of"),
    ([f"checkpoint={ROOT / 'checkpoints/micro-qwen3'}", "out=/tmp/x"], "not an artifact"),
    (["out=/tmp/x"], "missing mandatory value: checkpoint"),
    (["checkpoint=/nonexistent", "out=/tmp/x"], "not an artifact"),
])  # fmt: skip
def test_export_cli_bad_input_is_one_line_and_exit_2(args, match):
    p = subprocess.run([sys.executable, "-m", "qat.export", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert match in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
