"""The target reader on shards produced by the real pipeline: row alignment against the
scorer, sharding by rank and worker, seeded shuffling, exact mid-epoch resume, packing,
corruption, and the same shards through `datasets` and `ray.data`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import run as run_job
from pipeline.reader import IGNORE_INDEX, ShardError, TargetDataset, TargetLoader, open_run
from schemas.targets import LOGPROB_STEP
from tests.tiny_assets import tiny_job_config

K = 8
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def _text(s: int, d: int) -> str:
    n = 3 + (7 * s + 5 * d) % 11
    return f"Doc {s}-{d}: " + " ".join(WORDS[(s + d + i) % len(WORDS)] for i in range(n)) + "."


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_dir):
    """A run of 3 shards x 7 documents, 3 sequences per row group (so 9 units), made
    by the real job (in-process executor)."""
    root = tmp_path_factory.mktemp("reader-run")
    (root / "in").mkdir()
    texts = {}
    for s in range(3):
        recs = [{"id": f"s{s}d{d}", "text": _text(s, d)} for d in range(7)]
        texts.update({r["id"]: r["text"] for r in recs})
        (root / "in" / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = tiny_job_config(
        tiny_teacher_dir, f"{root}/in/*.jsonl", str(root / "out"), "output.row_group_rows=3"
    )
    assert run_job(cfg, executor="local").stats["documents"] == 21
    return {"dir": root / "out", "texts": texts, "teacher": tiny_teacher_dir}


def _seqs(batches, key="input_ids"):
    """Sequences (as tuples of real input ids) in the order batches deliver them."""
    out = []
    for b in batches:
        for row, attn in zip(b[key], b["attention_mask"], strict=True):
            out.append(tuple(row[attn].tolist()))
    return out


def _all(ds, num_workers=0):
    return list(TargetLoader(ds, num_workers=num_workers))


def test_rows_align_with_the_scorer(run):
    """Position t of a batch carries the scorer's row t + 1 (row t with a BOS), and
    labels are the next student token (EOS after the last)."""
    from pipeline.scoring import SubsetExactScorer
    from pipeline.teacher import HFTeacher
    from pipeline.tokenization import load_tokenizer, truncate_merges

    T = load_tokenizer(run["teacher"])
    scorer = SubsetExactScorer(T, truncate_merges(T, 60))
    teacher = HFTeacher(run["teacher"], device="cpu", max_batch_tokens=512)
    r = open_run(str(run["dir"]))
    eos = r.student_eos_id
    texts = [run["texts"][f"s{s}d{d}"] for s in range(3) for d in range(7)]
    # each shard's documents in one call, as the job (in this process) scored them: the
    # same float32 forwards in the same order, so the same numbers on any machine
    truth = [w for s in range(3) for w in scorer.score(teacher, texts[7 * s : 7 * s + 7], top_k=K)]
    for bos in (None, 5):
        ds = TargetDataset(str(run["dir"]), batch_size=4, shuffle=False, bos_id=bos)
        i = 0
        for batch in _all(ds):
            for b in range(batch["input_ids"].shape[0]):
                want = truth[i]
                i += 1
                L = len(want.student_ids)
                n = L + (bos is not None)
                rows = slice(0, L + 1) if bos is not None else slice(1, L + 1)
                ids = list(want.student_ids)
                assert (
                    batch["input_ids"][b, :n].tolist() == ([bos] if bos is not None else []) + ids
                )
                assert (
                    batch["attention_mask"][b, :n].all()
                    and not batch["attention_mask"][b, n:].any()
                )
                got_ids = batch["topk_ids"][b, :n].numpy()
                np.testing.assert_array_equal(got_ids, want.topk_ids[rows])
                got = batch["topk_logprobs"][b, :n].numpy()
                assert np.abs(got - want.topk_logprobs[rows]).max() <= LOGPROB_STEP / 2 + 1e-5
                np.testing.assert_allclose(
                    batch["target_logprob"][b, :n].numpy(), want.target_logprobs[rows], atol=1e-6
                )
                np.testing.assert_allclose(
                    batch["tail_mass"][b, :n].numpy(), want.tail_mass[rows], atol=1e-6
                )
                nxt = [*ids, eos] if bos is not None else [*ids[1:], eos]
                assert batch["labels"][b, :n].tolist() == nxt
                assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert i == len(truth)


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (3, 1), (2, 2)])
def test_ranks_and_workers_read_disjoint_complete_parts(run, world_size, num_workers):
    everything = _seqs(_all(TargetDataset(str(run["dir"]), batch_size=4, shuffle=False)))
    assert len(everything) == 21 == len(set(everything))
    seen = []
    units = []
    for rank in range(world_size):
        ds = TargetDataset(str(run["dir"]), batch_size=2, seed=3, rank=rank, world_size=world_size)
        part = _seqs(_all(ds, num_workers))
        seen += part
        units += [u for s in range(num_workers) for u in ds.stream_units(s, num_workers)]
        assert 0 < len(part) <= 21 and (world_size == 1 or len(part) < 21)
    assert sorted(seen) == sorted(everything)  # disjoint and complete
    # each row group is read by exactly one (rank, worker): nobody reads everything
    assert sorted(units) == list(range(9))


def test_shuffle_is_seeded_and_epochs_differ(run):
    def order(seed, epoch):
        return _seqs(_all(TargetDataset(str(run["dir"]), batch_size=3, seed=seed, epoch=epoch)))

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)
    assert sorted(a) == sorted(order(0, 1))
    plain = _seqs(_all(TargetDataset(str(run["dir"]), batch_size=3, shuffle=False)))
    assert a != plain and sorted(a) == sorted(plain)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_remaining_batches(run, num_workers):
    def ds():
        return TargetDataset(str(run["dir"]), batch_size=2, seed=7, shuffle_buffer=5)

    full = _all(ds(), num_workers)
    assert len(full) >= 8
    for stop in (1, 3, len(full) - 1):
        loader = TargetLoader(ds(), num_workers=num_workers)
        head = []
        for batch in loader:
            head.append(batch)
            if len(head) == stop:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint file
        resumed = TargetLoader(ds(), num_workers=num_workers)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(head) + len(rest) == len(full)
        for got, want in zip(head + rest, full, strict=True):
            assert got.keys() == want.keys()
            for key in got:
                assert torch.equal(got[key], want[key]), (stop, key)
    with pytest.raises(ValueError, match="num_workers"):
        TargetLoader(ds(), num_workers=num_workers + 1).load_state_dict(state)


def _stop_after(loader, n):
    """The first ``n`` batches of ``loader``, then its state as a checkpoint keeps it."""
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == n:
            break
    assert len(head) == n
    return head, json.loads(json.dumps(loader.state_dict()))


def _two_shards(run_dir):
    r = open_run(str(run_dir))
    r.shards = r.shards[:2]
    return r


@pytest.mark.parametrize(
    "base,change,keys",
    [
        ({}, {"batch_size": 4}, ["batch_size"]),
        ({}, {"pack_length": 16}, ["pack_length"]),
        ({"pack_length": 16}, {"pack_length": 12}, ["pack_length"]),
        ({}, {"shuffle": False}, ["shuffle", "shuffle_buffer"]),
        ({}, {"shuffle_buffer": 3}, ["shuffle_buffer"]),
        ({}, {"drop_last": True}, ["drop_last"]),
        ({"pack_length": 16}, {"bos_id": 5}, ["bos_id"]),
        ({"rank": 0, "world_size": 1}, {"rank": 0, "world_size": 2}, ["world_size"]),
        ({"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2}, ["rank"]),
        ({}, {"run": "two shards"}, ["shards"]),
    ],
)
def test_resume_refuses_other_batching_settings(run, base, change, keys):
    """A state saved after 7 batches of 2 counts 7 batches per stream; restored into a
    reader that batches or orders the run differently it would skip or repeat data
    (with 4 per batch: 28 sequences skipped instead of 14, so none of the 7 left came).
    It is refused, naming each setting with its saved and current value."""

    def ds(**kw):
        kw = {"batch_size": 2, "seed": 7, "shuffle_buffer": 5, **kw}
        if kw.pop("run", None):
            return TargetDataset(_two_shards(run["dir"]), **kw)
        return TargetDataset(str(run["dir"]), **kw)

    stop = 7 if base.get("world_size", 1) == 1 else 3  # a rank of 2 has ~5 batches
    saved = ds(**base)
    _, state = _stop_after(TargetLoader(saved), stop)
    other = ds(**{**base, **change})
    with pytest.raises(ValueError) as err:
        TargetLoader(other).load_state_dict(state)
    msg = str(err.value)
    for key in keys:
        if key == "shards":
            assert "shards: saved '3 shards, 21 sequences" in msg
            assert "current '2 shards, 14 sequences" in msg
        else:
            want = f"{key}: saved {getattr(saved, key)!r}, current {getattr(other, key)!r}"
            assert want in msg
    every = ["seed", "num_workers", "batch_size", "pack_length", "bos_id", "shuffle"]
    every += ["shuffle_buffer", "drop_last", "rank", "world_size", "shards"]
    assert {k for k in every if f"{k}: saved" in msg} == set(keys), msg
    assert "construct the TargetDataset" in msg and "saved settings" in msg
    # the same settings resume (the state itself is fine)
    TargetLoader(ds(**base)).load_state_dict(state)


def test_bos_without_packing_does_not_block_resume(run):
    """Without packing a BOS changes no batch's sequences, so resume accepts it."""
    ds = TargetDataset(str(run["dir"]), batch_size=2, seed=7)
    _, state = _stop_after(TargetLoader(ds), 3)
    TargetLoader(TargetDataset(str(run["dir"]), batch_size=2, seed=7, bos_id=5)).load_state_dict(
        state
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("pack_length", [None, 16])
def test_resume_with_the_same_settings_delivers_exactly_the_rest(run, num_workers, pack_length):
    """7 batches of 2, a checkpoint, a new reader with the same settings: the rest of
    the epoch is exactly what an uninterrupted run delivers after those 7 batches."""

    def loader():
        ds = TargetDataset(
            str(run["dir"]), batch_size=2, seed=7, shuffle_buffer=5, pack_length=pack_length
        )
        return TargetLoader(ds, num_workers=num_workers)

    full = _seqs(loader())
    head, state = _stop_after(loader(), 7)
    resumed = loader()
    resumed.load_state_dict(state)
    rest = _seqs(resumed)
    assert len(_seqs(head)) == 14
    assert _seqs(head) + rest == full
    if pack_length is None:
        assert len(rest) == 21 - 14


def test_old_state_without_settings(run):
    """A state from before the settings were recorded: loadable when nothing of the
    epoch was consumed; otherwise refused (it cannot be checked), unless the caller
    vouches for the settings by filling in the current ones."""

    def loader():
        return TargetLoader(TargetDataset(str(run["dir"]), batch_size=2, seed=7))

    old_keys = ("epoch", "seed", "num_workers", "consumed", "next_stream")
    full = _seqs(loader())
    head, state = _stop_after(loader(), 7)
    old = {k: state[k] for k in old_keys}
    with pytest.raises(ValueError, match=r"older reader that did not record batch_size") as err:
        loader().load_state_dict(old)
    assert "set_epoch(1)" in str(err.value)
    resumed = loader()
    resumed.load_state_dict({**resumed.state_dict(), **old})
    assert _seqs(head) + _seqs(resumed) == full
    # at the start of an epoch there is nothing to skip: any settings are safe
    fresh = {**old, "epoch": 1, "consumed": {}, "next_stream": 0}
    other = TargetLoader(TargetDataset(str(run["dir"]), batch_size=4, seed=7))
    other.load_state_dict(fresh)
    assert other.dataset.epoch == 1 and len(_seqs(other)) == 21


def test_packing_keeps_every_target_and_restarts_segments(run):
    plain = _all(TargetDataset(str(run["dir"]), batch_size=4, shuffle=False))
    packed = _all(TargetDataset(str(run["dir"]), batch_size=3, shuffle=False, pack_length=16))
    for b in packed:
        assert b["input_ids"].shape[1] == 16
        seg = b["segment_ids"]
        # positions restart at 0 at every segment start
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        assert (b["position_ids"][starts & (seg > 0)] == 0).all()
        assert torch.equal(b["attention_mask"], seg > 0)
        assert not b["loss_mask"][seg == 0].any()

    def flat(batches, key):
        return torch.cat([b[key][b["attention_mask"]] for b in batches])

    # the packed stream is the plain stream cut into rows of 16
    for key in ("input_ids", "labels", "topk_ids", "topk_logprobs", "tail_mass", "loss_mask"):
        assert torch.equal(flat(packed, key), flat(plain, key)), key


def test_corruption_is_named_never_silent(run, tmp_path):
    def copy():
        d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run["dir"], d)
        return d

    def read_all(d):
        return _all(TargetDataset(str(d), batch_size=4, shuffle=False))

    d = copy()
    f = d / "part-1.parquet"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"part-1.*(truncated|bytes)"):
        read_all(d)

    d = copy()  # one flipped byte inside the data pages: the page checksum catches it
    f = d / "part-2.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x5A
    f.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"part-2"):
        read_all(d)

    d = copy()
    (d / "part-0.parquet").unlink()
    with pytest.raises(ShardError, match=r"part-0.*missing"):
        read_all(d)

    d = copy()
    (d / "part-0.manifest.json").unlink()
    with pytest.raises(ShardError, match=r"part-0.*manifest"):
        open_run(str(d))

    d = copy()
    (d / "index.json").unlink()
    with pytest.raises(ShardError, match="no run index"):
        open_run(str(d))


def test_shards_open_with_datasets_streaming(run):
    """The README snippet: `datasets` streams the shards as plain Parquet."""
    import datasets

    from schemas.targets import decode_topk_logprobs

    files = sorted(str(p) for p in run["dir"].glob("*.parquet"))
    stream = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    rows = list(stream)
    assert len(rows) == 21
    plain = _all(TargetDataset(str(run["dir"]), batch_size=21, shuffle=False))[0]
    for i, row in enumerate(rows):
        ids = row["input_ids"]
        lp = decode_topk_logprobs(np.asarray(row["topk_logprob_dq"]).reshape(-1, K))
        L = len(ids)
        assert plain["input_ids"][i, :L].tolist() == ids
        np.testing.assert_array_equal(plain["topk_logprobs"][i, :L].numpy(), lp[1:])


def test_shards_open_with_ray_data(run, ray_local):
    import ray

    ds = ray.data.read_parquet(str(run["dir"]), file_extensions=["parquet"])  # README snippet
    assert ds.count() == 21
    rows = ds.take_all()
    assert sorted(r["doc_id"] for r in rows) == sorted(run["texts"])
    assert all(len(r["topk_ids"]) == K * (len(r["input_ids"]) + 1) for r in rows)


def _rank_part(rank: int, world: int, init_file: str, run_dir: str, out: str) -> None:
    """One process of a real torch.distributed (gloo) group: the dataset takes rank and
    world size from the process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = TargetDataset(run_dir, batch_size=2, seed=1)
        assert (ds.rank, ds.world_size) == (rank, world)
        torch.save(_seqs(_all(ds)), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_and_world_size_come_from_torch_distributed(run, tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.start_processes(
        _rank_part,
        args=(world, str(tmp_path / "init"), str(run["dir"]), str(tmp_path)),
        nprocs=world,
        start_method="spawn",
    )
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    everything = _seqs(_all(TargetDataset(str(run["dir"]), batch_size=4, shuffle=False)))
    assert all(parts) and sorted(parts[0] + parts[1]) == sorted(everything)
    assert not set(parts[0]) & set(parts[1])


def test_prefetching_does_not_change_the_stream(run):
    def stream(prefetch):
        return _all(TargetDataset(str(run["dir"]), batch_size=3, seed=2, prefetch=prefetch))

    a, b = stream(0), stream(3)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[key], y[key]) for key in x)


_S3_READ = """
import json, sys
from pipeline.reader import TargetDataset, TargetLoader
url, opts = sys.argv[1], json.loads(sys.argv[2])
ds = TargetDataset(url, batch_size=2, seed=3, storage_options=opts)
seqs = []
for b in TargetLoader(ds, num_workers=2):  # fork: the workers inherit the parent's s3fs
    seqs += [row[attn].tolist() for row, attn in zip(b["input_ids"], b["attention_mask"])]
print(json.dumps(seqs))
"""


@pytest.mark.integration
def test_forked_workers_read_s3_without_event_loop_errors(run, s3_server):
    """Two forked DataLoader workers over s3:// deliver every sequence and print nothing
    on stderr (a worker that reused the parent's cached s3fs instance, bound to the
    parent's event loop, printed asyncio "attached to a different loop" tracebacks)."""
    import os
    import subprocess
    import sys

    import s3fs

    opts, bucket = s3_server["options"], s3_server["bucket"]
    s3fs.S3FileSystem(skip_instance_cache=True, **opts).put(
        f"{run['dir']}/", f"{bucket}/reader-run/", recursive=True
    )
    proc = subprocess.run(
        [sys.executable, "-c", _S3_READ, f"s3://{bucket}/reader-run", json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "attached to a different loop" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    got = [tuple(s) for s in json.loads(proc.stdout)]
    local = _seqs(_all(TargetDataset(str(run["dir"]), batch_size=2, seed=3), num_workers=2))
    assert got == local and len(got) == 21
