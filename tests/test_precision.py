"""Precision as a stated choice: the deterministic mode and the config rules around an
``auto`` batch size (the stored targets must not depend on the free GPU memory)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.teacher import HFTeacher
from tests.tiny_assets import hf_tokenizer, tiny_causal_lm, tiny_teacher_tokenizer


def _cfg(*extra: str):
    return load_config(None, ["teacher.device=cpu", *extra])


def test_auto_batch_size_needs_an_explicit_context_and_no_deterministic_mode():
    with pytest.raises(ConfigError, match=r"needs teacher\.max_context"):
        _cfg("teacher.max_batch_tokens=auto")
    assert (
        _cfg("teacher.max_batch_tokens=auto", "teacher.max_context=1024").teacher.max_context
        == 1024
    )
    with pytest.raises(ConfigError, match="deterministic needs a fixed"):
        _cfg(
            "teacher.max_batch_tokens=auto", "teacher.max_context=512", "teacher.deterministic=true"
        )
    # both are target settings: a rerun with another value is refused by the resume guard
    keys = _cfg("teacher.deterministic=true").target_settings()
    assert keys["teacher.deterministic"] is True


@pytest.fixture
def deterministic_teacher():
    before = torch.are_deterministic_algorithms_enabled()
    tok = hf_tokenizer(tiny_teacher_tokenizer())
    yield HFTeacher(tiny_causal_lm(len(tok), seed=2), tok, device="cpu", deterministic=True)
    torch.use_deterministic_algorithms(before)


def test_deterministic_mode_is_switched_on_and_reruns_are_bit_identical(deterministic_teacher):
    assert torch.are_deterministic_algorithms_enabled()
    trees = [([-1, 3, 4, 5, 6], [-1, 0, 1, 1, 3]), ([-1, 7, 8], [-1, 0, 0])]
    a = deterministic_teacher.tree_logprobs(trees)
    b = deterministic_teacher.tree_logprobs(list(reversed(trees)))[::-1]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
