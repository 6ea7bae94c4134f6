"""Data sources and packing: every local source gives the same documents; rows are the EOS-joined token stream."""

from __future__ import annotations

import json

import pytest
import torch

from qat.config import DataConfig, RecipeError
from qat.data import build, load_documents, pack
from qat.models.tiny import byte_tokenizer

DOCS = ["def f(x):\n    return x\n", "import os\nprint(os.sep)\n", "class A:\n    pass\n"]


@pytest.fixture
def sources(tmp_path):
    import pandas as pd

    (tmp_path / "code.jsonl").write_text(
        "".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    )
    pd.DataFrame({"content": DOCS}).to_parquet(tmp_path / "code.parquet")
    src = tmp_path / "src"
    for i, d in enumerate(DOCS):
        (src / f"pkg{i}").mkdir(parents=True)
        (src / f"pkg{i}" / "m.py").write_text(d)
    (src / "pkg0" / "notes.txt").write_text("not code")
    return tmp_path


@pytest.mark.parametrize("name", ["code.jsonl", "code.parquet", "src"])
def test_local_sources_give_the_documents(sources, name):
    assert load_documents(DataConfig(path=str(sources / name)))["text"] == DOCS
    assert load_documents(DataConfig(path=str(sources / name), max_docs=2))["text"] == DOCS[:2]


def test_packing_is_the_eos_joined_stream():
    tok = byte_tokenizer()
    from datasets import Dataset

    rows = pack(Dataset.from_dict({"text": DOCS}), tok, seq_len=16)
    stream = [t for d in DOCS for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    ids = torch.stack([r["input_ids"] for r in rows])
    assert ids.shape == (len(stream) // 16, 16)
    assert ids.flatten().tolist() == stream[: len(stream) // 16 * 16]


def test_stdlib_source_is_real_code():
    docs = load_documents(DataConfig(path="stdlib", max_docs=5))["text"]
    assert len(docs) == 5 and all(isinstance(d, str) and d for d in docs)


def test_user_errors(sources):
    with pytest.raises(RecipeError, match="no such file"):
        load_documents(DataConfig(path=str(sources / "missing.jsonl")))
    with pytest.raises(RecipeError, match="text_field='code'"):
        load_documents(DataConfig(path=str(sources / "code.jsonl"), text_field="code"))
    with pytest.raises(RecipeError, match="fewer than one batch"):
        build(DataConfig(path=str(sources / "code.jsonl")), byte_tokenizer(), seq_len=512, min_rows=4)


def chat_source(tmp_path, pairs):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"instruction": p, "output": r}) + "\n" for p, r in pairs))
    return DataConfig(path=str(path), format="chat")


@pytest.mark.parametrize("real", [False, True])
def test_chat_rows_mask_the_prompt_and_pad_right(tmp_path, real):
    from tests.conftest import SHARED

    if real:
        from transformers import AutoTokenizer

        src = SHARED / "data" / "coda_checkpoint_format"
        if not src.is_dir():
            pytest.skip("no shared CoDA tokenizer")
        tok = AutoTokenizer.from_pretrained(src)
    else:
        tok = byte_tokenizer(eos="<|im_end|>")
    long = " ".join(f"w{i}" for i in range(200))
    pairs = [("Add two numbers.", "def add(a, b):\n    return a + b"), (long, "too long")]
    rows = build(chat_source(tmp_path, pairs), tok, seq_len=160)
    assert len(rows) == 1  # the over-length example is dropped, not truncated
    ids, src_mask, valid = rows[0]["input_ids"].tolist(), rows[0]["src_mask"], rows[0]["valid"]
    text = tok.apply_chat_template([{"role": "user", "content": pairs[0][0]},
                                    {"role": "assistant", "content": pairs[0][1]}], tokenize=False,
                                   enable_thinking=False)  # fmt: skip
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert ids[n:] == [tok.pad_token_id] * (160 - n) and valid.sum() == n and len(ids) == 160
    prompt = tok.decode(ids[: int(src_mask.sum())])
    assert prompt.endswith("<|im_start|>assistant") and pairs[0][0] in prompt
    assert "<think>" in tok.decode(ids[int(src_mask.sum()) : n]) and src_mask[: int(src_mask.sum())].all()
    if real:
        end = int(src_mask.sum())
        assert ids[end - 2 : end] == [151644, 77091]


def test_chat_needs_the_columns(tmp_path):
    cfg = chat_source(tmp_path, [("a", "b")])
    cfg.response_field = "answer"
    with pytest.raises(RecipeError, match="response_field"):
        load_documents(cfg)
