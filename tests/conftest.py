"""Shared fixtures: tiny random Qwen3 models built offline, an offline environment, the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QAT_KERNELS", "dense")  # exact, timing-independent outputs; kernel tests choose paths


def tiny_qwen3(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny Qwen3ForCausalLM in float32 (the committed tiny shapes unless overridden)."""
    from transformers import Qwen3ForCausalLM

    from qat.models.tiny import qwen3_config

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(260, **overrides)).eval()


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_qwen3()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))
