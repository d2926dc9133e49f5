"""Teachers: next-token log-probabilities from a `transformers` causal LM.

`HFTeacher` evaluates many teacher contexts that share prefixes in ONE forward pass:
the contexts of a document form a prefix tree, packed into a row with a tree-shaped
attention mask (each node attends to its ancestors and itself) and position ids equal
to the node's depth. Several trees share a row when they fit. The result equals running
every root-to-node path separately (checked in tests against plain forwards).

Device and precision are config choices: ``device="auto"`` takes CUDA when torch sees
one (a Ray actor with a simulated GPU has none, so it falls back to CPU), ``dtype="auto"``
is bfloat16 on GPU and float32 on CPU. Log-softmax is always computed in float32 and
logits are sliced to the tokenizer's real ids (padding columns such as Qwen2.5's
151,936 vs 151,665 are dropped). On GPU, use SDPA (the default here): flash-attention
kernels do not take arbitrary masks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.tokenization import DOC_END_TOKENS

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _euler_intervals(parents: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tin, tout, depth) of a tree given parents (node 0 the root, parents precede children).

    Node j is an ancestor-or-self of i iff tin[j] <= tin[i] < tout[j].
    """
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    for v in range(1, n):
        children[parents[v]].append(v)
    tin = np.zeros(n, np.int64)
    tout = np.zeros(n, np.int64)
    depth = np.zeros(n, np.int64)
    clock = 0
    stack: list[tuple[int, bool]] = [(0, False)]
    while stack:
        v, done = stack.pop()
        if done:
            tout[v] = clock
            continue
        tin[v] = clock
        clock += 1
        stack.append((v, True))
        for c in reversed(children[v]):
            depth[c] = depth[v] + 1
            stack.append((c, False))
    return tin, tout, depth


class HFTeacher:
    """A `transformers` causal LM as a teacher.

    Args:
        model: HF model id, local directory, or an already loaded causal LM.
        tokenizer: the teacher tokenizer (anything `transformers.AutoTokenizer` loads, or
            a loaded tokenizer); default: loaded from ``model``.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "auto", "float32", "bfloat16", "float16" (model weights; log-softmax is float32).
        max_batch_tokens: tree nodes (incl. padding) per forward pass.
        start_token: the context token for "start of text": "auto" uses the BOS the
            tokenizer adds by itself if any, else the first document-end token the vocab
            has (``<|endoftext|>`` for Qwen and SmolLM2: documents are separated by it in
            pre-training), else the tokenizer's EOS.
        temperature: logits are divided by it before the softmax.
        gguf_file: load weights from this GGUF file inside ``model`` (a directory).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_batch_tokens: int = 2048,
        start_token: str | int = "auto",
        temperature: float = 1.0,
        revision: str | None = None,
        gguf_file: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.name = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
        self.revision = revision
        if isinstance(model, (str, os.PathLike)):
            from pipeline.assets import model_source_problem

            problem = model_source_problem(model, "teacher")
            if problem:
                raise FileNotFoundError(problem)
            kwargs: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": "sdpa"}
            if revision:
                kwargs["revision"] = revision
            if gguf_file:
                kwargs["gguf_file"] = gguf_file
            model = AutoModelForCausalLM.from_pretrained(str(model), **kwargs)
            if tokenizer is None:
                tk: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
                tokenizer = AutoTokenizer.from_pretrained(str(self.name), **tk)
        elif tokenizer is None:
            raise ValueError("pass the teacher tokenizer along with a loaded model")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        n_logits = int(self.model.config.vocab_size)
        if n_logits < self.vocab_size:
            raise ValueError(
                f"model has {n_logits} logits but the tokenizer has {self.vocab_size} ids"
            )
        self.max_batch_tokens = int(max_batch_tokens)
        self.temperature = float(temperature)
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        # Row width at which attention costs about as much as the rest of a layer.
        self.attention_scale = 8 * int(getattr(self.model.config, "hidden_size", 512))
        self.start_ids = self._start_ids(start_token)
        self.forwarded_tokens = 0  # incl. padding, for benchmarks

    def _start_ids(self, start_token: str | int) -> list[int]:
        tok = self.tokenizer
        if isinstance(start_token, int):
            return [start_token]
        if start_token != "auto":
            tid = tok.convert_tokens_to_ids(start_token)
            if tid is None or tid == tok.unk_token_id:
                raise ValueError(f"start_token {start_token!r} is not in the teacher vocab")
            return [int(tid)]
        bos = tok("", add_special_tokens=True)["input_ids"]
        if bos:
            return [int(x) for x in bos]
        vocab = tok.get_vocab()
        for c in DOC_END_TOKENS:
            if c in vocab:
                return [int(vocab[c])]
        if tok.eos_token_id is not None:
            return [int(tok.eos_token_id)]
        raise ValueError("cannot choose a start-of-text token; pass start_token=")

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def next_token_logprobs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probs [len(contexts), vocab_size] after each context (one tree forward)."""
        index: dict[tuple[int, ...], int] = {(): 0}
        tokens, parents = [-1], [-1]
        rows = []
        for ctx in contexts:
            node = 0
            for k in range(len(ctx)):
                key = tuple(ctx[: k + 1])
                nxt = index.get(key)
                if nxt is None:
                    nxt = len(tokens)
                    index[key] = nxt
                    tokens.append(int(ctx[k]))
                    parents.append(node)
                node = nxt
            rows.append(node)
        (lp,) = self.tree_logprobs([(tokens, parents)])
        return lp[torch.as_tensor(rows, device=lp.device)]

    @torch.inference_mode()
    def tree_logprobs(
        self, trees: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[torch.Tensor]:
        """For each tree (tokens, parents; node 0 = start of text, token ignored), the
        float32 log-probs [num_nodes, vocab_size] after every node, on ``self.device``."""
        s = len(self.start_ids)
        sizes = [len(t) - 1 + s for t, _ in trees]
        for n in sizes:
            if n > self.max_batch_tokens:
                raise ValueError(
                    f"a context tree of {n} tokens exceeds max_batch_tokens={self.max_batch_tokens}; "
                    "chunk the document or raise the limit"
                )
        out: list[torch.Tensor | None] = [None] * len(trees)
        for rows, width in self._plan(sizes):
            self._forward_rows(trees, rows, width, out)
        return [o for o in out if o is not None]

    def _plan(self, sizes: Sequence[int]) -> list[tuple[list[list[int]], int]]:
        """Split trees into forward batches of rows: [(rows of tree indices, row width)].

        Trees are sorted by size; each batch takes a run of consecutive trees, its row
        width is the run's largest tree, and smaller trees are packed first-fit into its
        rows (at most ``max_batch_tokens`` per batch). Dynamic programming over run
        boundaries minimises sum(rows * width * (1 + width / attention_scale)) plus a
        per-forward overhead: padding is redundant work, but attention is quadratic in
        the row width (a tree mask rules out the causal fast path).
        """
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        n = len(order)
        # A forward costs a fixed amount besides its tokens; on a GPU a small batch is
        # about as slow as a full one, so batches are kept full there.
        overhead = (0.25 if self.device.type == "cuda" else 0.02) * self.max_batch_tokens
        best = [0.0] + [math.inf] * n
        choice: list[tuple[int, list[list[int]], int]] = [(0, [], 0)] * (n + 1)
        for k in range(n):
            if best[k] == math.inf:
                continue
            width = sizes[order[k]]
            max_rows = max(1, self.max_batch_tokens // width)
            rows: list[list[int]] = []
            fill: list[int] = []
            for j in range(k, n):
                size = sizes[order[j]]
                r = next((q for q, f in enumerate(fill) if f + size <= width), None)
                if r is None:
                    if len(rows) == max_rows:
                        break
                    rows.append([])
                    fill.append(0)
                    r = len(rows) - 1
                rows[r].append(order[j])
                fill[r] += size
                cost = best[k] + overhead + len(rows) * width * (1 + width / self.attention_scale)
                if cost < best[j + 1]:
                    best[j + 1] = cost
                    choice[j + 1] = (k, [list(x) for x in rows], width)
        plan = []
        j = n
        while j > 0:
            k, rows, width = choice[j]
            plan.append((rows, width))
            j = k
        return plan[::-1]

    def _forward_rows(
        self,
        trees: Sequence[tuple[Sequence[int], Sequence[int]]],
        group: list[list[int]],
        width: int,
        out: list[torch.Tensor | None],
    ) -> None:
        s = len(self.start_ids)
        B = len(group)
        ids = np.zeros((B, width), np.int64)
        pos = np.zeros((B, width), np.int64)
        tin_all = np.full((B, width), -1, np.int64)
        tout_all = np.full((B, width), -1, np.int64)
        where: list[tuple[int, int, int, int]] = []  # (tree, row, offset, n)
        for b, members in enumerate(group):
            off = 0
            clock = 0
            for ti in members:
                tokens, parents = trees[ti]
                n = len(tokens)
                full_tokens = [*self.start_ids, *[int(t) for t in tokens[1:]]]
                full_parents = [-1, *range(s - 1)] + [s - 1 + int(p) for p in parents[1:]]
                tin, tout, depth = _euler_intervals(full_parents)
                if int(depth.max()) >= self.max_positions:
                    raise ValueError(
                        f"a context of {int(depth.max()) + 1} tokens exceeds the teacher's "
                        f"{self.max_positions} positions; chunk the document"
                    )
                m = len(full_tokens)
                ids[b, off : off + m] = full_tokens
                pos[b, off : off + m] = depth
                tin_all[b, off : off + m] = tin + clock
                tout_all[b, off : off + m] = tout + clock
                where.append((ti, b, off + s - 1, n))
                off += m
                clock += m
            # padding: each pad position attends to itself only
            npad = width - off
            if npad:
                tin_all[b, off:] = np.arange(clock, clock + npad)
                tout_all[b, off:] = tin_all[b, off:] + 1
        tin_t = torch.as_tensor(tin_all)
        tout_t = torch.as_tensor(tout_all)
        allowed = (tin_t[:, None, :] <= tin_t[:, :, None]) & (
            tin_t[:, :, None] < tout_t[:, None, :]
        )
        mask = torch.zeros((B, 1, width, width), dtype=self.dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        pin = self.device.type == "cuda"
        ids_t, pos_t = torch.as_tensor(ids), torch.as_tensor(pos)
        if pin:
            ids_t, pos_t, mask = ids_t.pin_memory(), pos_t.pin_memory(), mask.pin_memory()
        logits = self.model(
            input_ids=ids_t.to(self.device, non_blocking=pin),
            attention_mask=mask.to(self.device, non_blocking=pin),
            position_ids=pos_t.to(self.device, non_blocking=pin),
        ).logits
        self.forwarded_tokens += B * width
        for ti, b, start, n in where:
            out[ti] = self._log_softmax(logits[b, start : start + n])

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 log-softmax over the real ids; the normaliser is summed in float64 so
        that exp(row) sums to 1 within ~1e-7 (float32 summation leaves ~1e-5)."""
        lg = logits[..., : self.vocab_size].float()
        if self.temperature != 1.0:
            lg = lg / self.temperature
        mx = lg.max(dim=-1, keepdim=True).values
        lse = torch.log(torch.exp(lg - mx).double().sum(dim=-1, keepdim=True)).float() + mx
        return lg - lse

    @torch.inference_mode()
    def teacher_forcing_logprobs(
        self, sequences: Sequence[Sequence[int]], top_k: int = 0
    ) -> list[torch.Tensor]:
        """Plain causal forward over each sequence (after the start token): returns, per
        sequence, log P(token_i | tokens_<i) for every token ([len(seq)] float32).

        ``top_k > 0`` also computes a top-k of every row (the work a same-tokenizer
        target generator does); used as the baseline in benchmarks.
        """
        s = len(self.start_ids)
        out: list[torch.Tensor | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        i = 0
        while i < len(order):
            width = len(sequences[order[i]]) + s
            nrows = max(1, self.max_batch_tokens // max(width, 1))
            grp = order[i : i + nrows]
            i += nrows
            ids = torch.zeros((len(grp), width), dtype=torch.long)
            att = torch.zeros((len(grp), width), dtype=torch.long)
            for b, k in enumerate(grp):
                row = [*self.start_ids, *sequences[k]]
                ids[b, : len(row)] = torch.as_tensor(row)
                att[b, : len(row)] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=att.to(self.device)
            ).logits
            self.forwarded_tokens += len(grp) * width
            lp = torch.stack([self._log_softmax(row) for row in logits])
            if top_k:
                torch.topk(lp, top_k, dim=-1)
            for b, k in enumerate(grp):
                n = len(sequences[k])
                tgt = torch.as_tensor(sequences[k], device=lp.device)
                out[k] = lp[b, s - 1 : s - 1 + n].gather(1, tgt[:, None]).squeeze(1)
        return [o for o in out if o is not None]
