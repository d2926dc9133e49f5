"""Fixtures shared by the scoring tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: the byte model's tensors are tiny, so thread-pool
    overhead would dominate (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def random_teacher():
    """A seeded random LM (float64) over a trained byte-level BPE: every token sequence
    has mass, non-canonical ones included. Returns (tokenizer, teacher)."""
    from tests.scoring.float64_teacher import Float64Teacher
    from tests.tiny_assets import hf_tokenizer, tiny_causal_lm, trained_byte_bpe

    tok = trained_byte_bpe(400)
    hf = hf_tokenizer(tok)
    model = tiny_causal_lm(len(hf), arch="llama", seed=3)
    return tok, Float64Teacher(model, hf, device="cpu", max_batch_tokens=512)
