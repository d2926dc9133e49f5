"""Overlap of the tokenizer phase with the teacher forward, on a simulated accelerator.

Runs the real `pipeline.generate.GenerateStep` (in-process, no Ray) over the demo input
(GSM8K chats from ../shared/data when present) with a simulated teacher in place of the
model (`SimulatedTeacher`): a real `pipeline.teacher.HFTeacher` (its forward plan, tree
inputs and masks run as they do on a GPU host) whose model is `SimulatedForward`: real
log-probs from a fixed random table over the real vocab keyed by each node's token (id
mod 64: a cheap "bigram" model), and `time.sleep` so that each forward takes ``forwarded
teacher tokens / rate`` seconds in all (the sleep releases the GIL, as a CUDA sync does).

Per vocabulary (SmolLM2 with its 8,000-merge student; the Qwen2 vocab with its
32,000-merge student when ../shared/data has it, ChatML template), three modes of
`GenerateStep`: ``seq`` (sequential), ``thread`` (overlap: the producer thread runs the
tokenizer phase) and ``process`` (overlap with ``prepare_workers=1``: a worker process
runs it, the producer thread collects its results), two tables:

- the row phase on the host, as the pipeline runs here: the log-probs are CPU tensors,
  so the scorer's row phase (device work on a GPU) runs on the CPU and dominates the
  host time (``--row-docs`` records per shard: it is slow);
- the row phase as accelerator work (`RowReplay`): the teacher call runs (host inputs,
  simulated forward) and the rows recorded by a real run come back, so the simulated
  rate stands for forward + rows and the host does what a GPU host does (all
  ``--docs``).

Each table: the host-only rate (rate = inf, the CPU ceiling, in forwarded teacher
tokens/s), then at ``--rates`` multiples of that ceiling: accelerator-busy fraction
(time inside the simulated forward / wall time; "+rows" counts the row phase as
accelerator time too), student tokens/s, and host CPU us per student token by phase
(`time.thread_time` of the thread that runs it: torch's intra-op worker threads are not
in it; the process total is printed beside it; in ``process`` mode the prepare column is
the worker process's whole CPU time, which the process total does not include). The shards of every run are compared
(sha256): the overlapped path must write the same bytes as the sequential one.

``--max-batch-tokens`` (default 1024; the demo config has 2048) sets the forward size;
`GenerateStep` cuts batches of 4 x that many context nodes (about 16 GSM8K chats, which
still fit one 512-token context). ``--torch-threads`` (default 1): on 2 cores, the
scoring thread and the producer thread fill them; more torch threads oversubscribe.

    python -m jobs.bench.overlap [--docs 256] [--shards 1] [--row-docs 32]
        [--max-batch-tokens 1024] [--rates 0.25,0.5,1] [--vocab smollm2,qwen2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from pipeline.teacher import HFTeacher, tree_attention_mask

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
)

# (label, phase keys summed); CPU us per student token is printed for each
PHASES = (
    ("prepare", ("prepare",)),
    ("masks", ("loss masks",)),
    ("inputs", ("tree/mask inputs",)),
    ("fwd wrap", ("forward wrapper",)),
    ("sim fwd", ("sim forward",)),
    ("rows", ("row phase",)),
    ("seqs", ("sequences",)),
    ("encode", ("table+Parquet encode",)),
    ("commit", ("commit",)),
    ("read", ("read shard",)),
)


class Phases:
    """CPU (`time.thread_time` of the calling thread) and wall time per named phase,
    from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        with self.lock:
            self.cpu.clear()
            self.wall.clear()

    def add(self, name: str, cpu: float, wall: float) -> None:
        with self.lock:
            self.cpu[name] += cpu
            self.wall[name] += wall

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        c, w = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.thread_time() - c, time.perf_counter() - w)


class SimulatedForward(torch.nn.Module):
    """A causal LM stand-in: logits = log-probs of a fixed random table row chosen by
    the input token (``id % rows``), then a sleep so that the call lasts ``B * W / rate``
    seconds (``rate``: forwarded teacher tokens/s; inf: no sleep)."""

    def __init__(
        self,
        vocab_size: int,
        phases: Phases,
        *,
        rate: float = math.inf,
        rows: int = 64,
        seed: int = 0,
        max_positions: int = 8192,
        hidden_size: int = 576,
    ) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_size=hidden_size
        )
        g = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(rows, vocab_size, generator=g) * 3.0, dim=-1)
        self.rows = rows
        self.rate = rate
        self.phases = phases
        self.inputs_from: tuple[float, float] | None = None  # set by the teacher
        # False: logits are one table row broadcast (no copy), for callers that drop them
        self.materialize = True
        # True: a forward returns at once and its time passes on a device thread, as a
        # CUDA launch returns before the kernels run; `sync` waits for the device
        self.asynchronous = False
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-device")
        self._last: Future[None] | None = None

    def _run(self, seconds: float) -> None:
        w = time.perf_counter()
        time.sleep(seconds)
        self.phases.add("sim forward", 0.0, time.perf_counter() - w)

    def sync(self) -> None:
        """Wait until the device has run every forward queued so far."""
        if self._last is not None:
            with self.phases("device wait"):
                self._last.result()

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        c, w = time.thread_time(), time.perf_counter()
        if self.inputs_from is not None:  # the teacher's host side of this forward
            self.phases.add("tree/mask inputs", c - self.inputs_from[0], w - self.inputs_from[1])
            self.inputs_from = None
        if self.materialize:
            logits = self.table[input_ids % self.rows]
        else:
            logits = self.table[0].expand(*input_ids.shape, self.table.shape[1])
        if self.asynchronous:
            if not math.isinf(self.rate):  # the device runs the queued forwards in order
                self._last = self._device.submit(self._run, input_ids.numel() / self.rate)
            return SimpleNamespace(logits=logits)
        left = input_ids.numel() / self.rate - (time.perf_counter() - w)
        if left > 0:
            time.sleep(left)
        self.phases.add("sim forward", time.thread_time() - c, time.perf_counter() - w)
        return SimpleNamespace(logits=logits)


class SimulatedTeacher(HFTeacher):
    """`HFTeacher` around a `SimulatedForward` (the tokenizer and limits of the real
    teacher; its own plan, input and mask code). ``rate`` is settable between runs."""

    def __init__(
        self,
        tokenizer: Any,
        phases: Phases,
        *,
        max_batch_tokens: int,
        max_positions: int = 8192,
        hidden_size: int = 576,
        rate: float = math.inf,
    ) -> None:
        self.sim = SimulatedForward(
            len(tokenizer),
            phases,
            rate=rate,
            max_positions=max_positions,
            hidden_size=hidden_size,
        )
        self.phases = phases
        super().__init__(
            self.sim, tokenizer, device="cpu", dtype="float32", max_batch_tokens=max_batch_tokens
        )

    @property
    def rate(self) -> float:
        return self.sim.rate

    @rate.setter
    def rate(self, value: float) -> None:
        self.sim.rate = value

    def _forward_rows(
        self, trees: Any, group: list[list[int]], width: int
    ) -> tuple[torch.Tensor, dict[int, int]]:
        with self.phases("teacher call"):
            self.sim.inputs_from = (time.thread_time(), time.perf_counter())
            if self.sim.materialize:
                return super()._forward_rows(trees, group, width)
            # replayed rows read no log-probs: the same host inputs, mask and simulated
            # forward, and one table row broadcast instead of the copy of the logits
            ids, _pos, tin, tout, where = self._row_inputs(trees, group, width)
            mask = tree_attention_mask(torch.from_numpy(tin), torch.from_numpy(tout), self.dtype)
            self.sim(input_ids=torch.from_numpy(ids), attention_mask=mask)
            self.forwarded_tokens += len(group) * width
            first, row = {}, 0
            for ti, _, _, n in where:
                first[ti] = row
                row += n
            return self.sim.table[0, : self.vocab_size].expand(row, -1), first

    def _log_softmax_(self, out: torch.Tensor) -> torch.Tensor:
        return out  # the table rows are log-probs already


# ---------------------------------------------------------------------- set-up
def qwen2_teacher_dir(shared: Path, out: Path) -> Path:
    """The full Qwen2 tokenizer (shared vocab/merges with the components and added
    tokens of the shared students, as `tests/scoring/test_subset_qwen2.py` builds it)
    saved as an HF tokenizer directory with a ChatML template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((shared / "qwen2-subsets" / "8000" / "tokenizer.json").read_text())
    vocab = json.loads((shared / "qwen2-tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    lines = (shared / "qwen2-tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [
        ln.split(" ", 1) for ln in lines if ln and not ln.startswith("#version")
    ]
    for k, a in enumerate(spec["added_tokens"]):
        a["id"] = len(vocab) + k
    tok = Tokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return out


def make_step(
    vocab: str, shards: list[str], out: str, tmp: Path, phases: Phases, max_batch_tokens: int
) -> Any:
    """A set-up `GenerateStep` for the demo config with a `SimulatedTeacher`, its phases
    instrumented."""
    from transformers import AutoTokenizer

    import pipeline.generate as gen
    from jobs.generate import DEMO_CONFIG
    from pipeline.assets import shared_data_dir, smollm2_dir
    from pipeline.config import load_config

    overrides = [
        f"input.paths={json.dumps(shards)}",
        f"output.path={out}",
        "teacher.device=cpu",
        f"teacher.max_batch_tokens={max_batch_tokens}",
    ]
    if vocab == "smollm2":
        model_dir = smollm2_dir()
        hidden, positions = 576, 8192
    else:
        shared = shared_data_dir()
        assert shared is not None
        model_dir = qwen2_teacher_dir(shared, tmp / "qwen2-teacher")
        student = shared / "qwen2-subsets" / "32000" / "tokenizer.json"
        overrides += [f"teacher.model={model_dir}", f"student.tokenizer={student}"]
        hidden, positions = 896, 32768  # Qwen2-0.5B's
    cfg = load_config(DEMO_CONFIG, overrides)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    mbt = cfg.teacher.max_batch_tokens  # 'auto' sizes by GPU memory: 2048 here
    teacher = SimulatedTeacher(
        tok,
        phases,
        max_batch_tokens=mbt if isinstance(mbt, int) else 2048,
        max_positions=positions,
        hidden_size=hidden,
    )
    step = gen.GenerateStep(cfg, teacher=teacher)
    step.setup()

    def timed(obj: Any, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with phases(phase):
                return wrapper.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        setattr(obj, name, wrapper)

    timed(step, "prepared_chunks", "prepare")
    timed(step, "_student_mask", "loss masks")
    timed(step, "_sequence", "sequences")
    launch = step.targets.launch

    class Timed:  # the launch's result, its host work timed as "score" too
        def __init__(self, pending: Any) -> None:
            self.pending = pending

        def result(self) -> Any:
            with phases("score"):
                return self.pending.result()

    def timed_launch(*args: Any, **kwargs: Any) -> Any:
        with phases("score"):
            return Timed(timed_launch.__wrapped__(*args, **kwargs))  # type: ignore[attr-defined]

    timed_launch.__wrapped__ = launch  # type: ignore[attr-defined]
    step.targets.launch = timed_launch  # type: ignore[method-assign]
    return step


@contextmanager
def timed_module_functions(phases: Phases) -> Iterator[None]:
    """Time the shard-level functions `pipeline.generate` calls (read, encode, commit)."""
    import pipeline.generate as gen

    names = {
        "read_shard": "read shard",
        "build_table": "table+Parquet encode",
        "encode_parquet": "table+Parquet encode",
        "commit_shard": "commit",
    }
    saved = {n: getattr(gen, n) for n in names}

    def wrap(fn: Any, phase: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with phases(phase):
                return fn(*args, **kwargs)

        return wrapper

    try:
        for n, phase in names.items():
            setattr(gen, n, wrap(saved[n], phase))
        yield
    finally:
        for n, fn in saved.items():
            setattr(gen, n, fn)


# ---------------------------------------------------------------------- runs
# mode -> (GenerateStep.overlap, GenerateStep.prepare_workers)
MODES = {"seq": (False, 0), "thread": (True, 0), "process": (True, 1)}


def worker_cpu(step: Any) -> float:
    """CPU seconds (user + system) of the step's prepare worker processes so far."""
    pool = step._workers
    total = 0.0
    for proc in pool.procs if pool is not None else ():
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def run(step: Any, shards: list[str], out: str, mode: str, rate: float) -> dict[str, Any]:
    phases: Phases = step.teacher.phases
    step.overlap, step.prepare_workers = MODES[mode]
    step.teacher.rate = rate
    step.teacher.forwarded_tokens = 0
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    phases.reset()
    if mode == "process":  # start the worker and let it build its scorer first
        from pipeline.records import Document

        list(step._pool().outcomes([Document(0, "warm-up", "warm up")]))
    k0, c0, w0 = worker_cpu(step), time.process_time(), time.perf_counter()
    manifests = [step.process_shard(u) for u in shards]
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    cpu_ph = dict(phases.cpu)
    if mode == "process":  # the worker's whole CPU: its tokenizer phase and masks
        cpu_ph["prepare"] = worker_cpu(step) - k0
    wall_ph = dict(phases.wall)
    # nested phases: score = teacher call + row phase; teacher call = inputs + sim + wrapper
    cpu_ph["row phase"] = cpu_ph.get("score", 0.0) - cpu_ph.get("teacher call", 0.0)
    cpu_ph["forward wrapper"] = (
        cpu_ph.get("teacher call", 0.0)
        - cpu_ph.get("tree/mask inputs", 0.0)
        - cpu_ph.get("sim forward", 0.0)
    )
    return {
        "mode": mode,
        "rate": rate,
        "wall": wall,
        "cpu": cpu,
        "busy": wall_ph.get("sim forward", 0.0) / wall,
        # + the row phase (score - teacher call): device work on a GPU
        "busy_rows": (
            wall_ph.get("sim forward", 0.0)
            + wall_ph.get("score", 0.0)
            - wall_ph.get("teacher call", 0.0)
            - wall_ph.get("device wait", 0.0)
        )
        / wall,
        "tokens": sum(m["student_tokens"] for m in manifests),
        "forwarded": step.teacher.forwarded_tokens,
        "sha256": [m["sha256"] for m in manifests],
        "phases": cpu_ph,
    }


def show(r: dict[str, Any]) -> str:
    n = r["tokens"]
    rate = "inf" if math.isinf(r["rate"]) else f"{r['rate']:,.0f}"
    cols = " ".join(
        f"{sum(r['phases'].get(k, 0.0) for k in keys) / n * 1e6:8.1f}" for _, keys in PHASES
    )
    return (
        f"{rate:>9} {r['mode']:>8} {r['busy']:5.3f} {r['busy_rows']:5.3f} {n / r['wall']:7.1f} "
        f"{r['wall']:6.1f} {cols}"
        f" {r['cpu'] / n * 1e6:8.1f}"
    )


def header() -> str:
    cols = " ".join(f"{label:>8}" for label, _ in PHASES)
    return (
        f"{'rate':>9} {'mode':>8} {'busy':>5} {'+rows':>5} {'tok/s':>7} {'wall s':>6} {cols} "
        f"{'proc CPU':>8}\n{'':>45}"
        + "host CPU us per student token by phase (thread time); proc CPU: whole process"
    )


class _Done:
    """A pending result that is ready (or waits for the simulated device first)."""

    def __init__(self, out: list[Any], wait: Any = None) -> None:
        self.out, self.wait = out, wait

    def result(self) -> list[Any]:
        if self.wait is not None:
            self.wait()
        return self.out


class RowReplay:
    """``TargetKinds.launch`` with the row phase as accelerator work (``replay`` on): the
    batch's teacher forwards run as the real call makes them (host inputs and masks, the
    simulated forward; the log-probs are dropped) and the rows recorded by an earlier
    real call on the same texts and masks come back, so the shards stay the same and the
    row phase costs the host nothing; the simulated rate then stands for forward + rows.
    With an asynchronous simulated device the results wait for its forwards, as reading
    a GPU's results waits for its kernels."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.replay = False
        self.memo: dict[tuple[str, bytes | None], Any] = {}

    def __call__(
        self,
        teacher: Any,
        prepared: Sequence[Any],
        *args: Any,
        rows: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        masks = list(rows) if rows is not None else [None] * len(prepared)
        keys = [
            (p.text, None if m is None else m.tobytes())
            for p, m in zip(prepared, masks, strict=True)
        ]
        if not self.replay or any(k not in self.memo for k in keys):
            out = self.real(teacher, prepared, *args, rows=rows, **kwargs).result()
            self.memo.update(zip(keys, out, strict=True))
            return _Done(list(out))
        group: list[Any] = []
        size = 0
        for tree in (p.tree for p in prepared if p.tree is not None):
            if group and size + len(tree[0]) > teacher.max_batch_tokens:
                teacher.tree_logprobs(group)
                group, size = [], 0
            group.append(tree)
            size += len(tree[0])
        if group:
            teacher.tree_logprobs(group)
        return _Done([self.memo[k] for k in keys], teacher.sim.sync)


def table(
    step: Any, shards: list[str], out: str, mults: list[float], target: float
) -> list[dict[str, Any]]:
    """Host-only ceiling, then sequential vs overlapped at ``mults`` x that ceiling."""
    results = [run(step, shards, out, mode, math.inf) for mode in MODES]
    base_seq = results[0]
    ceiling = base_seq["forwarded"] / base_seq["wall"]
    prep_cpu = base_seq["phases"].get("prepare", 0.0) + base_seq["phases"].get("loss masks", 0.0)
    prep_ceiling = base_seq["forwarded"] / prep_cpu
    print(
        f"host-only ceiling (sequential, rate=inf): {ceiling:,.0f} forwarded "
        f"teacher tokens/s = {base_seq['tokens'] / base_seq['wall']:,.1f} student tokens/s; "
        f"the producer's work alone (prepare + loss masks, one thread): {prep_ceiling:,.0f} "
        "forwarded teacher tokens/s",
        flush=True,
    )
    print(header())
    for r in results:
        print(show(r), flush=True)
    for m in mults:
        for mode in MODES:
            r = run(step, shards, out, mode, m * ceiling)
            r["mult"] = m
            results.append(r)
            print(show(r), flush=True)
    print(f"busy fraction >= {target} where the simulated rate is below the producer's rate:")
    for r in results:
        if r["mode"] == "seq" or math.isinf(r["rate"]):
            continue
        seq = next(x for x in results if x["rate"] == r["rate"] and x["mode"] == "seq")
        below = r["rate"] < prep_ceiling
        print(
            f"  rate {r['rate']:,.0f} ({r['mult']:g} x ceiling, "
            f"{'below' if below else 'above'} the producer's), {r['mode']}: busy "
            f"{r['busy']:.3f} (sequential {seq['busy']:.3f}; counting the row phase: "
            f"{r['busy_rows']:.3f} vs {seq['busy_rows']:.3f}), speed-up "
            f"{seq['wall'] / r['wall']:.2f}x: "
            + (("met" if r["busy"] >= target else "NOT met") if below else "not applicable")
        )
    return results


def bench_vocab(vocab: str, shards: list[str], args: argparse.Namespace, tmp: Path) -> bool:
    out = str(tmp / f"out-{vocab}")
    phases = Phases()
    step = make_step(vocab, shards, out, tmp, phases, args.max_batch_tokens)
    replay = RowReplay(step.targets.launch.__wrapped__)
    step.targets.launch.__wrapped__ = replay
    mults = [float(x) for x in args.rates.split(",")]
    print(
        f"\n== {vocab}: teacher vocab {step.targets.T.size}, scorer {step.kind}, student vocab "
        f"{step.scorer.student.size if step.scorer else '-'}, max_batch_tokens "
        f"{step.teacher.max_batch_tokens} (batches of {4 * step.teacher.max_batch_tokens} "
        f"context nodes), torch threads {torch.get_num_threads()}",
        flush=True,
    )
    same = True
    with timed_module_functions(phases):
        for docs, rows_replayed in ((args.row_docs, False), (None, True)):
            step.cfg.input.limit = docs  # records per shard
            replay.replay = False
            step.teacher.sim.materialize = True
            # warm-up (tokenizer caches, allocator) and the real rows for the replay
            warm = run(step, shards, out, "seq", math.inf)
            replay.replay = rows_replayed
            step.teacher.sim.materialize = not rows_replayed  # replayed rows read no log-probs
            # replayed rows: the device runs forward + rows while the host goes on
            step.teacher.sim.asynchronous = rows_replayed and not args.synchronous
            title = (
                "the row phase as accelerator work (rows replayed; the rate is forward + rows)"
                if rows_replayed
                else "the row phase on the host (CPU log-probs), as run"
            )
            print(
                f"\n-- {title}: {docs or 'all'} records per shard, student tokens "
                f"{warm['tokens']}, forwarded teacher tokens {warm['forwarded']} "
                f"({warm['forwarded'] / warm['tokens']:.3f} per student token)",
                flush=True,
            )
            results = table(step, shards, out, mults, args.target)
            ok = all(r["sha256"] == warm["sha256"] for r in results)
            print(
                f"shards byte-identical across these {len(results) + 1} runs (sha256): "
                + ("yes" if ok else "NO"),
                flush=True,
            )
            same &= ok
    step.close()
    return same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench.overlap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docs", type=int, default=256, help="demo documents in all")
    p.add_argument("--shards", type=int, default=1, help="input shards they are written in")
    p.add_argument(
        "--row-docs",
        type=int,
        default=32,
        help="records per shard for the runs with the row phase on the host (slow on CPU)",
    )
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="teacher forward size")
    p.add_argument(
        "--rates",
        default="0.25,0.5,1",
        help="simulated forward rates, as multiples of the host-only ceiling",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: the scoring thread and the producer fill 2 cores)",
    )
    p.add_argument("--vocab", default="smollm2,qwen2", help="smollm2 and/or qwen2")
    p.add_argument("--target", type=float, default=0.9, help="busy fraction target")
    p.add_argument(
        "--synchronous",
        action="store_true",
        help="replayed rows: a forward blocks the host until the device is done (the "
        "model before the pipeline queued batch i+1 before reading batch i)",
    )
    args = p.parse_args(argv)

    from jobs.generate import demo_inputs
    from pipeline.assets import shared_data_dir

    torch.set_num_threads(args.torch_threads)
    shards = demo_inputs(args.docs, args.shards)
    print(
        f"{args.docs} demo documents in {len(shards)} shards ({Path(shards[0]).parent.name}), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    tmp = Path(tempfile.mkdtemp(prefix="xtok-bench-overlap-"))
    same = True
    try:
        for vocab in args.vocab.split(","):
            shared = shared_data_dir()
            if vocab == "qwen2" and (
                shared is None or not (shared / "qwen2-subsets" / "32000").is_dir()
            ):
                print("\n== qwen2: skipped (../shared/data has no Qwen2 tokenizer)")
                continue
            same &= bench_vocab(vocab, shards, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
