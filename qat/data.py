"""Code data: documents from files, a directory or the hub, tokenized and packed into fixed-length rows.

Sources (`data.path`):
    *.jsonl / *.json / *.parquet   local files, the code in column `data.text_field`
    a directory                    every file matching `data.glob` below it (sorted), one document each
    stdlib                         this Python's standard library sources (tests excluded): real code that
                                   every machine has, the offline default
    anything else                  a `datasets` hub id (`bigcode/the-stack-smol`, …), split `data.split`

Packing: each document is tokenized, followed by EOS, all documents are concatenated and cut into rows of
`seq_len` tokens, PACK_DOCS documents at a time (the tail of each chunk shorter than a row is dropped,
which bounds memory on large corpora). No padding, every token is trained on; documents
can share a row, separated by EOS, as in standard causal-LM pretraining.

Order is deterministic: documents are sorted (files) or in dataset order, `max_docs` takes the first N.
Shuffling happens in the trainer's DataLoader with an explicit, checkpointed generator.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

from qat.config import DataConfig, RecipeError

PACK_DOCS = 1000
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, pattern: str) -> list[Path]:
    skip = {"test", "tests", "site-packages", "__pycache__", "idle_test"}
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not skip & set(p.relative_to(root).parts[:-1]))


def load_documents(cfg: DataConfig) -> Dataset:
    """A Dataset with one column `text`, one code document per row."""
    src = cfg.path
    path = stdlib_dir() if src == "stdlib" else Path(src)
    if path.is_dir():
        files = _files(path, cfg.glob)
        if cfg.max_docs:
            files = files[: cfg.max_docs]
        if not files:
            raise RecipeError(f"data.path={src}: no files matching {cfg.glob!r}")
        return Dataset.from_dict({"text": [f.read_text(encoding="utf-8", errors="replace") for f in files]})
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise RecipeError(f"data.path={src}: no such file")
        ds = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        ds = load_dataset(src, split=cfg.split)
    if cfg.text_field not in ds.column_names:
        raise RecipeError(f"data.text_field={cfg.text_field!r} is not a column of {src} (columns: {ds.column_names})")
    if cfg.max_docs:
        ds = ds.select(range(min(cfg.max_docs, len(ds))))
    return ds.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text")


def pack(docs: Dataset, tokenizer, seq_len: int) -> Dataset:
    """Rows of `input_ids` [seq_len] (torch format): tokenized documents + EOS, concatenated and cut."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    def cut(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, n, seq_len)]}

    toks = docs.map(tokenize, batched=True, remove_columns=docs.column_names, desc="tokenize")
    rows = toks.map(cut, batched=True, batch_size=PACK_DOCS, remove_columns=["ids"], desc="pack")
    return rows.with_format("torch")


def build(cfg: DataConfig, tokenizer, seq_len: int, min_rows: int = 1) -> Dataset:
    rows = pack(load_documents(cfg), tokenizer, seq_len)
    if len(rows) < min_rows:
        raise RecipeError(
            f"data.path={cfg.path} gives {len(rows)} rows of {seq_len} tokens, fewer than one batch ({min_rows}); "
            "add data, raise data.max_docs or lower train.seq_len / train.batch_size"
        )
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([r["input_ids"] for r in rows])
