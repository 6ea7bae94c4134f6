"""Code data: documents from files, a directory or the hub, tokenized and packed into fixed-length rows.

Sources (`data.path`):
    *.jsonl / *.json / *.parquet   local files, the code in column `data.text_field`
    a directory                    every file matching `data.glob` below it (sorted), one document each
    stdlib                         this Python's standard library sources (tests excluded): real code that
                                   every machine has, the offline default
    anything else                  a `datasets` hub id (`bigcode/the-stack-smol`, …), split `data.split`

Two row formats (`data.format`):

    packed   each document is tokenized, followed by EOS, all documents are concatenated and cut into rows of
             `seq_len` tokens, PACK_DOCS documents at a time (the tail of each chunk shorter than a row is
             dropped, which bounds memory on large corpora). No padding, every token is trained on; documents
             can share a row, separated by EOS, as in causal-LM pretraining. For the diffusion model a row's
             documents see each other (bidirectional attention, no document mask), as in CoDA's mid-training.
    chat     one (prompt, response) pair per row, rendered with the tokenizer's chat template as a user and an
             assistant turn (`enable_thinking=False`), right-padded with the pad token to exactly `seq_len`;
             longer examples are dropped, not truncated (CoDA's SFT preprocessing). Rows carry `src_mask`
             (True up to and including the last `<|im_start|>assistant`: the prompt, which is conditioned on
             and never trained) and `valid` (False on padding).

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
    """One document per row: column `text` (packed format) or `prompt` and `response` (chat format)."""
    src = cfg.path
    path = stdlib_dir() if src == "stdlib" else Path(src)
    if path.is_dir():
        if cfg.format == "chat":
            raise RecipeError(f"data.format=chat needs a jsonl/parquet file or a hub dataset, not a directory ({src})")
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
        ds = load_dataset(src, cfg.subset or None, split=cfg.split)
    fields = {"text": cfg.text_field} if cfg.format == "packed" else {"prompt": cfg.prompt_field,
                                                                      "response": cfg.response_field}  # fmt: skip
    for key, column in fields.items():
        if column not in ds.column_names:
            which = "text_field" if key == "text" else f"{key}_field"
            raise RecipeError(f"data.{which}={column!r} is not a column of {src} (columns: {ds.column_names})")
    if cfg.max_docs:
        ds = ds.select(range(min(cfg.max_docs, len(ds))))
    return ds.select_columns(list(fields.values())).rename_columns({v: k for k, v in fields.items()})


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


ASSISTANT = "<|im_start|>assistant"


def _last_occurrence(seq: list[int], sub: list[int]) -> int:
    """Index just past the last occurrence of `sub` in `seq`, or -1."""
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i : i + len(sub)] == sub:
            return i + len(sub)
    return -1


def chat(docs: Dataset, tokenizer, seq_len: int) -> Dataset:
    """Rows of `input_ids`, `src_mask`, `valid` [seq_len] (torch format), one prompt/response pair each."""
    if tokenizer.chat_template is None:
        raise RecipeError("data.format=chat needs a tokenizer with a chat template")
    marker = tokenizer.encode(ASSISTANT, add_special_tokens=False)
    pad = tokenizer.pad_token_id

    def render(batch):
        out = {"input_ids": [], "src_mask": [], "valid": []}
        for prompt, response in zip(batch["prompt"], batch["response"], strict=True):
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = tokenizer.apply_chat_template(turns, tokenize=False, enable_thinking=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            end = _last_occurrence(ids, marker)
            if end < 0:
                raise RecipeError(f"the chat template does not produce {ASSISTANT!r}; cannot find the prompt's end")
            if len(ids) > seq_len:
                continue  # dropped, not truncated: a cut answer would teach the model to stop mid-solution
            n = seq_len - len(ids)
            out["input_ids"].append(ids + [pad] * n)
            out["src_mask"].append([True] * end + [False] * (seq_len - end))
            out["valid"].append([True] * len(ids) + [False] * n)
        return out

    rows = docs.map(render, batched=True, remove_columns=docs.column_names, desc="chat")
    return rows.with_format("torch")


def build(cfg: DataConfig, tokenizer, seq_len: int, min_rows: int = 1) -> Dataset:
    docs = load_documents(cfg)
    rows = pack(docs, tokenizer, seq_len) if cfg.format == "packed" else chat(docs, tokenizer, seq_len)
    if len(rows) < min_rows:
        raise RecipeError(
            f"data.path={cfg.path} gives {len(rows)} rows of {seq_len} tokens, fewer than one batch ({min_rows}); "
            "add data, raise data.max_docs or lower train.seq_len / train.batch_size"
        )
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
