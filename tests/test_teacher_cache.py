"""The teacher cache against the teacher itself: bitwise logits, hits, keys that separate weights and batches."""

from __future__ import annotations

import copy

import pytest
import torch

from qat import objectives
from qat.models import load
from qat.teacher_cache import TeacherCache, fingerprint
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["micro-qwen3", "micro-coda"])
def test_cached_teacher_gives_the_teachers_logits_bit_for_bit(tmp_path, name):
    teacher = load(ROOT / "checkpoints" / name)[0].eval().requires_grad_(False)
    cache = TeacherCache(teacher, tmp_path)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    sel = torch.rand(2, 15, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        want = teacher(input_ids=x).logits
        assert torch.equal(cache(input_ids=x).logits, want)  # a miss: computed, and written
        assert (cache.hits, cache.misses) == (0, 1) and len(list(tmp_path.glob("*.pt"))) == 1
        assert torch.equal(cache(input_ids=x).logits, want)  # a hit: read back
        for s in (None, sel):  # through the scored-positions hook on the head, as the trainer calls it
            with objectives.scored_head(cache, s):
                got = cache(input_ids=x).logits
            assert torch.equal(got, want[:, :-1] if s is None else want[:, :-1][s])
    assert (cache.hits, cache.misses) == (3, 1)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


def test_the_key_separates_batches_weights_and_thread_counts(tmp_path):
    teacher = load(ROOT / "checkpoints" / "micro-qwen3")[0]
    cache = TeacherCache(teacher, tmp_path)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[1, 3] += 1
    assert cache.key(x) == cache.key(x.clone()) and cache.key(x) != cache.key(y)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert fingerprint(other) != fingerprint(teacher) == cache.print
    assert TeacherCache(other, tmp_path).key(x) != cache.key(x)
    threads, before = torch.get_num_threads(), cache.key(x)
    try:
        torch.set_num_threads(threads + 1)  # another matmul blocking: another entry
        assert cache.key(x) != before
    finally:
        torch.set_num_threads(threads)


def test_hidden_state_distillation_is_refused(tmp_path):
    cache = TeacherCache(load(ROOT / "checkpoints" / "micro-qwen3")[0], tmp_path)
    with pytest.raises(ValueError, match="kd_hidden"):
        cache(input_ids=torch.zeros(1, 4, dtype=torch.long), output_hidden_states=True)
