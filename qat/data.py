"""Code data: documents from files, a directory or the hub, tokenized and packed into fixed-length rows.

Sources (`data.path`):
    *.jsonl / *.json / *.parquet   local files, the code in column `data.text_field`
    a directory                    every file matching `data.glob` below it (sorted), one document each
    stdlib                         this Python's standard library sources (tests excluded): real code that
                                   every machine has, the offline default
    pkg:NAME                       the Python sources of the installed package NAME (tests excluded), at the
                                   version installed (`describe` names it): third-party code every install
                                   of this toolkit has, a held-out corpus the stdlib-trained models never saw
    anything else                  a `datasets` hub id (`bigcode/the-stack-smol`, …), split `data.split`

Directory sources (a directory, `stdlib`, `pkg:NAME`) are split into train and validation by file:

    split(path) = validation  if  md5(relative path)[:8] / 16^8 < data.val_fraction  else  train

so the split is deterministic across machines and Python patch releases (it depends on the path alone, not on
the file's content or the listing order), and no file is in both. `data.split` picks `train`, `validation` or
`all`; for hub datasets it is the hub's split name. `eval_source` names the trainer's validation data: the
training source's validation split, or `data.eval_path` when given (its `all` split for directories).

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

import hashlib
import importlib.metadata
import importlib.util
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

from qat.config import DataConfig, RecipeError

PACK_DOCS = 1000
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def package_dir(name: str) -> Path:
    """The source directory of an installed top-level package (`pkg:NAME`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"data.path=pkg:{name}: no installed package {name!r} with a source directory")
    return Path(list(spec.submodule_search_locations)[0])


def package_version(name: str) -> str:
    """The installed distribution version of top-level package NAME (its distribution may be named otherwise)."""
    for dist in importlib.metadata.packages_distributions().get(name, [name]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def source_dir(src: str) -> Path | None:
    """The directory behind a directory source (`stdlib`, `pkg:NAME`, a path), else None."""
    if src == "stdlib":
        return stdlib_dir()
    if src.startswith("pkg:"):
        return package_dir(src[4:])
    return Path(src) if Path(src).is_dir() else None


def describe(cfg: DataConfig) -> str:
    """A name for a data source that says exactly what was read: `stdlib 3.11.7 [validation 5%]`,
    `pkg:accelerate==1.15.0`, a path or hub id with its split."""
    src = cfg.path
    if src == "stdlib":
        name = f"stdlib {sys.version.split()[0]}"
    elif src.startswith("pkg:"):
        name = f"{src}=={package_version(src[4:])}"
    else:
        name = src
    if source_dir(src) is not None:
        return name if cfg.split == "all" else f"{name} [{cfg.split} {cfg.val_fraction:.0%}]"
    return f"{name} [{cfg.split}]" if not Path(src).is_file() else name


def file_split(rel: str, val_fraction: float) -> str:
    """`train` or `validation` for a file, from its relative path alone (see the module docstring)."""
    h = int(hashlib.md5(rel.encode()).hexdigest()[:8], 16) / 16**8
    return "validation" if h < val_fraction else "train"


def _files(root: Path, pattern: str) -> list[Path]:
    skip = {"test", "tests", "site-packages", "__pycache__", "idle_test"}
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not skip & set(p.relative_to(root).parts[:-1]))


def files(cfg: DataConfig) -> list[Path]:
    """The files of a directory source in `cfg.split` (sorted, then the first `max_docs`)."""
    root = source_dir(cfg.path)
    if root is None:
        raise RecipeError(f"data.path={cfg.path}: not a directory source")
    found = _files(root, cfg.glob)
    if cfg.split != "all":
        found = [p for p in found if file_split(p.relative_to(root).as_posix(), cfg.val_fraction) == cfg.split]
    return found[: cfg.max_docs] if cfg.max_docs else found


def eval_source(cfg: DataConfig) -> DataConfig:
    """The validation data of a recipe: `data.eval_path` (all of it, for a directory), else the training
    source's validation split (a hub dataset's `validation` split)."""
    if cfg.eval_path:
        return replace(cfg, path=cfg.eval_path, split="all" if source_dir(cfg.eval_path) else "validation",
                       max_docs=0)  # fmt: skip
    if Path(cfg.path).is_file():
        raise RecipeError(f"data.path={cfg.path} is one file with no validation split: set data.eval_path")
    return replace(cfg, split="validation", max_docs=0)


def load_documents(cfg: DataConfig) -> Dataset:
    """One document per row: column `text` (packed format) or `prompt` and `response` (chat format)."""
    src = cfg.path
    path = source_dir(src) or Path(src)
    if path.is_dir():
        if cfg.format == "chat":
            raise RecipeError(f"data.format=chat needs a jsonl/parquet file or a hub dataset, not a directory ({src})")
        if cfg.split not in ("train", "validation", "all"):
            raise RecipeError(f"data.split={cfg.split!r}: a directory source splits into train, validation or all")
        found = files(cfg)
        if not found:
            raise RecipeError(f"data.path={src}: no files matching {cfg.glob!r} in split {cfg.split!r}")
        return Dataset.from_dict({"text": [f.read_text(encoding="utf-8", errors="replace") for f in found]})
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


_PACKED: dict[str, Dataset] = {}  # memo of `pack` (a study packs the same corpus for every cell)
_PACKED_MAX = 8


def _fingerprint(docs: Dataset, tokenizer, seq_len: int) -> str | None:
    """A key for `pack`'s result: the documents' text, the tokenizer's full definition and EOS, the row length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "text" not in docs.column_names:
        return None
    h = hashlib.blake2b(digest_size=16)
    for text in docs["text"]:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    h.update(backend.to_str().encode() + f"|{tokenizer.eos_token_id}|{seq_len}".encode())
    return h.hexdigest()


def pack(docs: Dataset, tokenizer, seq_len: int) -> Dataset:
    """Rows of `input_ids` [seq_len] (torch format): tokenized documents + EOS, concatenated and cut.
    Memoized in-process on (documents, tokenizer, seq_len)."""
    key = _fingerprint(docs, tokenizer, seq_len)
    if key is not None and key in _PACKED:
        return _PACKED[key]
    rows = _pack(docs, tokenizer, seq_len)
    if key is not None:
        while len(_PACKED) >= _PACKED_MAX:
            _PACKED.pop(next(iter(_PACKED)))
        _PACKED[key] = rows
    return rows


def _pack(docs: Dataset, tokenizer, seq_len: int) -> Dataset:
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


def spread(rows: Dataset, k: int) -> torch.Tensor:
    """`input_ids` of k windows evenly spaced over the packed rows [k, seq_len] (all of them when k >= len).
    Deterministic, and it samples the whole corpus: the first k rows would come from the first few files in
    sorted order (in the stdlib's validation split, mostly the `encodings` tables, far easier than the rest)."""
    n = len(rows)
    if k >= n:
        return rows["input_ids"][:]
    idx = torch.linspace(0, n - 1, k).round().long().tolist()
    return rows.select(idx)["input_ids"][:]


def windows(cfg: DataConfig, tokenizer, seq_len: int, k: int) -> torch.Tensor:
    """k windows of `seq_len` tokens spread over the packed documents of `cfg` (`spread`): the held-out sample every
    measure uses (eval.heldout, the trainer's validation, the study). A source too short for one window is an error."""
    rows = pack(load_documents(cfg), tokenizer, seq_len)
    if len(rows) == 0:
        raise RecipeError(f"{describe(cfg)} gives no window of {seq_len} tokens")
    return spread(rows, k)


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
