"""The tiny models' tokenizer: a byte-level BPE trained on the standard library's train split.

    python -m qat.models.bpe out=checkpoints/init/bpe [vocab_size=8192] [data.*=...]

Byte-level BPE (GPT-2's scheme, the `tokenizers` library): text is split by GPT-2's pre-tokenizer regex
(words, numbers, punctuation runs, whitespace runs so that indentation becomes a few tokens), each piece is
mapped byte by byte onto 256 printable symbols, and merges are learned greedily by pair frequency until the
vocabulary holds `vocab_size` entries. Every byte is in the base alphabet, so any string encodes and decodes
back exactly (no unknown token), which is what code needs.

Special tokens, ids 0–3, are the ones both families use: `<|endoftext|>` (document separator, padding, the AR
model's EOS), `<|im_start|>` / `<|im_end|>` (chat turns; `<|im_end|>` ends an assistant answer) and `<|mask|>`
(the diffusion model's mask). They are never produced by merges and never split. The chat template is the
ChatML one Qwen3 and CoDA render (qat.models.tiny.CHAT_TEMPLATE).

Training data: the files of `data.*` (default: the stdlib's train split, so validation and held-out code stay
unseen), read in sorted order; the `tokenizers` trainer is deterministic for a given input order, so the same
Python version gives the same vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from qat.config import DataConfig, RecipeError, exit_on_error, parse_cli
from qat.data import files
from qat.models.tiny import CHAT_TEMPLATE, SPECIALS


def train_bpe(texts, vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` entries (specials included) learned on the iterable `texts`."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )  # fmt: skip
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("data."))
    with exit_on_error():
        unknown = set(opts) - {"out", "vocab_size"}
        if unknown:
            raise RecipeError(f"unknown arguments {sorted(unknown)}: out=DIR vocab_size=N data.KEY=VALUE")
        if "out" not in opts:
            raise RecipeError("out=DIR is required")
        least = 256 + len(SPECIALS)  # the byte alphabet and the special tokens
        try:
            vocab = int(opts.get("vocab_size", 8192))
        except ValueError:
            vocab = -1
        if vocab < least:
            raise RecipeError(f"vocab_size must be an integer >= {least}, got {opts.get('vocab_size')!r}")
        cfg = parse_cli(DataConfig, [a.removeprefix("data.") for a in args if a.startswith("data.")])
        paths = files(cfg)
    tok = train_bpe((p.read_text(encoding="utf-8", errors="replace") for p in paths), vocab)
    out = Path(opts["out"])
    tok.save_pretrained(out)
    print(f"{out}: {len(tok)} tokens from {len(paths)} files")
    return out


if __name__ == "__main__":
    main()
