"""A frozen teacher's last hidden states, computed once per batch and shared by every run that distils from it.

A frozen teacher is a pure function: its logits on a micro-batch depend only on its weights and the input ids.
A study distils the same base into many students on the same batches (QAT and QAT-from-GPTQ at every width
draw the same data order and the same diffusion noise for one `train.seed`), so every run after the first
recomputes the same teacher forward. `train.teacher_cache=DIR` keeps, per micro-batch, the teacher decoder's
last hidden state [B, L, H] (post final norm) in DIR, under a key that hashes

    the teacher's weights (every tensor of its state dict, in name order), the input ids, and what changes the
    arithmetic: the thread count, the autocast dtype, the device type

so a hit returns the very bits a recomputation would give (the matmul blocking depends on the thread count),
and a changed base, batch, seed or precision can never read another's entry. The LM head still runs on every
step, on the scored positions only (`objectives.scored_head` hooks it as for any model): the cached state is
[B, L, H] (2 MiB for 8 × 256 × 256 float32, against [B, L, V] logits 32× larger at an 8k vocabulary), and the
head is a fraction of a small model's forward. What is saved is the teacher's decoder: about a quarter of a
QAT step's matmul FLOPs (a forward beside the student's forward and backward).

Entries are written atomically (a temporary file, then a rename), so concurrent runs (`eval.ablate workers=N`)
share a directory safely: two that miss the same key both compute it and write the same bytes. Nothing is
evicted; the study deletes its cache when it is done.

Not covered: sharded teachers (FSDP, ZeRO-3: the decoder's weights are not whole on a rank), hidden-state
distillation (`train.kd_hidden`: needs every layer), models whose logits are not `head(decoder(ids))` (logit
soft-capping); the trainer keeps the plain teacher then and says why.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor of `model`'s state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def unsupported(teacher: torch.nn.Module) -> str | None:
    """Why `teacher` cannot be cached (None when it can)."""
    if not callable(getattr(teacher, "get_decoder", None)) or teacher.get_output_embeddings() is None:
        return "the teacher has no separate decoder and head"
    if getattr(teacher.config, "final_logit_softcapping", None):
        return "the teacher soft-caps its logits after the head"
    return None


class TeacherCache(torch.nn.Module):
    """`teacher` with its decoder's output memoized in `directory`: called like the model (`input_ids=`), it
    returns an object with `.logits` = head(last hidden state), bitwise what `teacher(input_ids=...)` gives."""

    def __init__(self, teacher: torch.nn.Module, directory: str | Path) -> None:
        super().__init__()
        why = unsupported(teacher)
        if why:
            raise ValueError(f"train.teacher_cache: {why}")
        self.teacher, self.dir = teacher, Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.print = fingerprint(teacher)
        self.hits = self.misses = 0

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.teacher.get_output_embeddings()

    def key(self, input_ids: torch.Tensor) -> str:
        dev = input_ids.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{self.print};{torch.get_num_threads()};{amp};{dev};{input_ids.dtype};{tuple(input_ids.shape)};"
                 .encode())  # fmt: skip
        h.update(input_ids.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> SimpleNamespace:
        if output_hidden_states:
            raise ValueError("train.teacher_cache keeps the last hidden state only (train.kd_hidden needs all)")
        path = self.dir / f"{self.key(input_ids)}.pt"
        hidden = None
        if path.is_file():
            try:
                hidden = torch.load(path, map_location=input_ids.device, weights_only=True)
                self.hits += 1
            except (OSError, RuntimeError, EOFError):  # unreadable (a disk error): recompute and rewrite it
                hidden = None
        if hidden is None:
            hidden = self.teacher.get_decoder()(input_ids=input_ids).last_hidden_state
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(hidden.cpu(), tmp)
            os.replace(tmp, path)
            self.misses += 1
        return SimpleNamespace(logits=self.get_output_embeddings()(hidden))
