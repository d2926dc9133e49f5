"""The subset-exact row phase over a batch of documents (`SubsetExactScorer.rows_batch`):
the same rows as one document at a time, documents sharing tree nodes, and a device part
with no host synchronisation (it runs on PyTorch's ``meta`` device, where any read of a
tensor's values on the host — ``.item()``, ``bool()``, ``nonzero``, ``unique``, a
``repeat_interleave`` without its output size — raises)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.scoring.kinds import TargetKinds
from pipeline.scoring.subset import SubsetExactScorer
from pipeline.scoring.trees import merge_context_trees, teacher_tree_batches
from pipeline.tokenization import truncate_merges
from tests.scoring.float64_teacher import Float64Teacher
from tests.tiny_assets import hf_tokenizer, tiny_causal_lm, trained_byte_bpe

TEXTS = [
    "hello world, it's a test",
    "café naïve 中文 😀 done.  ",
    "a  1\n\n  x\t\ty   \n",
    "I'll we've they're DON'T",
    "",
]


@pytest.fixture(scope="module")
def world():
    tok = trained_byte_bpe(400)
    model = tiny_causal_lm(tok.get_vocab_size(with_added_tokens=True), arch="llama", seed=5)
    teacher = Float64Teacher(model, hf_tokenizer(tok), device="cpu", max_batch_tokens=2048)
    return tok, teacher, SubsetExactScorer(tok, truncate_merges(tok, 60))


def _fields(d):
    return {
        "ids": d.topk_ids,
        "lp": d.topk_logprobs,
        "tail": d.tail_mass,
        "target": d.target_logprobs,
        "unmapped": d.unmapped_mass,
        "noncanonical": d.noncanonical_mass,
        "prefix": d.prefix_logprob,
        "teacher": np.asarray([d.stats["teacher_logprob"]]),
    }


def test_a_batch_gives_each_document_its_own_rows(world):
    _tok, teacher, sc = world
    docs = [sc.prepare(t) for t in TEXTS]
    # one merged tree: the documents share nodes (the start of text at least)
    trees, where = merge_context_trees(docs, max_nodes=1 << 30)
    assert len(trees) == 1
    ((lp, first),) = list(teacher_tree_batches(teacher, trees))
    items = [(d, first[0] + np.asarray(w[1])) for d, w in zip(docs, where, strict=True)]
    batched = sc.rows_batch(lp, items, 8).result()
    for d, (_, nodes), got in zip(docs, items, batched, strict=True):
        alone = sc._rows(d, lp[torch.as_tensor(nodes)], 8)
        a, b = _fields(got), _fields(alone)
        assert np.array_equal(a["ids"], b["ids"])
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-12, err_msg=k)
        assert got.topk_ids.shape == (len(d.student_ids) + 1, 8)


def test_the_device_part_never_waits_for_the_host(world):
    _tok, teacher, sc = world
    docs = [sc.prepare(t) for t in TEXTS]
    trees = [d.tree() for d in docs]
    n = 0
    for lp, first in teacher_tree_batches(teacher, trees):
        items = [(docs[t], first[t] + np.arange(docs[t].num_nodes)) for t in first]
        meta = lp.to("meta")
        for top_k in (8, None):
            pending = sc.rows_batch(meta, items, top_k)
            assert pending._copy._host["cols"].device.type == "meta"
        n += len(items)
    assert n == len(TEXTS)
    # the control: reading a meta tensor's values on the host raises
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(torch.zeros(3, device="meta").sum())


def test_kinds_share_one_forward_and_its_normalisers(world):
    tok, teacher, sc = world
    kinds = TargetKinds(tok, ["student", "bytes", "teacher"], sc)
    forwards = []
    real = teacher._forward_rows

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        forwards.append(out[0].shape[0])
        return out

    teacher._forward_rows = spy
    try:
        res = kinds.score(teacher, TEXTS, top_k=8, byte_top_k=4)
    finally:
        del teacher._forward_rows
    assert len(forwards) == 1  # every kind of every text from one forward batch
    for r in res:
        total = r.teacher.total
        s = r.student
        student = (
            s.target_logprobs.sum()
            + np.log1p(-s.noncanonical_mass).sum()
            + np.log1p(-s.unmapped_mass).sum()
        )
        assert abs(student - total) < 1e-9 * (len(s.target_logprobs) + 1) * 8


def test_the_device_path_gives_the_rows_of_the_cpu_path(world):
    """Off the CPU the numerators are not kept ([nodes, V] of memory): each gather takes
    its exp. Run that path on the CPU: the same rows."""
    from pipeline.scoring.subset import row_norms

    _tok, teacher, sc = world
    docs = [sc.prepare(t) for t in TEXTS]
    for lp, first in teacher_tree_batches(teacher, [d.tree() for d in docs]):
        items = [(docs[t], first[t] + np.arange(docs[t].num_nodes)) for t in first]
        kept = row_norms(lp, torch.float64)
        gathered = row_norms(lp, torch.float64, table=False)
        assert kept.table is not None and gathered.table is None
        for top_k in (8, None):
            a = sc.rows_batch(lp, items, top_k, kept).result()
            b = sc.rows_batch(lp, items, top_k, gathered).result()
            for x, y in zip(a, b, strict=True):
                if top_k is None:
                    np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=0, atol=1e-12)
                    continue
                fx, fy = _fields(x), _fields(y)
                for k in fx:
                    np.testing.assert_allclose(fx[k], fy[k], rtol=0, atol=1e-12, err_msg=k)
