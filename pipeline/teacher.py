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

The host sends only ids, position ids and each position's Euler interval ([B, W] each) to
the device, which builds the [B, 1, W, W] mask (`tree_attention_mask`); forwards run with
``use_cache=False``. `estimate_forward_bytes` is the peak device memory of a forward batch
(formula below, checked against measured CPU peaks in tests/test_memory_plan.py) and
`plan_max_batch_tokens` the largest batch that fits (``max_batch_tokens="auto"``).

`HFTeacher.prefix_tree_logprobs` serves contexts that continue one long shared prefix (a
document's canonical teacher ids, `pipeline.scoring.trees.PrefixTree`) from a KV cache:
each distinct prefix is forwarded once (causally, ``use_cache=True``), its keys and values
are kept in a byte-bounded LRU, and later calls forward only their new nodes against
them with a [1, 1, nodes, cached + nodes] mask (`prefix_node_mask`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.tokenization import DOC_END_TOKENS

if TYPE_CHECKING:
    from pipeline.scoring.trees import PrefixTree

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


# On CUDA the mask's rows are allocated 8 elements wide: SDPA's memory-efficient kernel
# takes a mask whose strides are multiples of 8 as it is, and copies any other (per layer).
MASK_ALIGN = 8


def tree_attention_mask(
    tin: torch.Tensor, tout: torch.Tensor, dtype: torch.dtype, align: int = 1
) -> torch.Tensor:
    """The additive tree mask [B, 1, W, W] of rows with Euler intervals tin/tout [B, W],
    built where tin lives: query j attends to key i iff tin[i] <= tin[j] < tout[i]
    (0 there, the dtype's min elsewhere). ``align`` > 1 rounds the allocated row length
    up to a multiple of it (the result is a view of the first W columns).

    Memory: B*W*W bools twice while it is built, then the mask B*W*roundup(W, align)
    entries of ``dtype``."""
    B, W = tin.shape
    q = tin[:, :, None]
    blocked = tin[:, None, :] <= q
    blocked &= q < tout[:, None, :]
    blocked.logical_not_()
    wa = -(-W // align) * align
    mask = torch.zeros((B, 1, W, wa), dtype=dtype, device=tin.device)[..., :W]
    mask.masked_fill_(blocked[:, None], torch.finfo(dtype).min)
    return mask


def prefix_node_mask(
    visible: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    cached: int,
    dtype: torch.dtype,
    align: int = 1,
) -> torch.Tensor:
    """The additive mask [1, 1, m, cached + m] of m new positions forwarded after
    ``cached`` kept ones (`HFTeacher.prefix_tree_logprobs`), built where ``visible``
    lives: new position j sees the kept positions < visible[j] and the new positions i
    with tin[i] <= tin[j] < tout[i] (its ancestors and itself: Euler intervals of the new
    positions' forest, [m] each). ``align`` as in `tree_attention_mask`."""
    m = int(visible.shape[0])
    cols = torch.arange(cached, device=visible.device)
    blocked_kept = cols[None, :] >= visible[:, None]
    q = tin[:, None]
    seen = tin[None, :] <= q
    seen &= q < tout[None, :]
    blocked = torch.cat([blocked_kept, seen.logical_not_()], dim=1)
    width = cached + m
    wa = -(-width // align) * align
    mask = torch.zeros((1, 1, m, wa), dtype=dtype, device=visible.device)[..., :width]
    mask.masked_fill_(blocked[None, None], torch.finfo(dtype).min)
    return mask


# ---------------------------------------------------------------- memory planning
# The peak memory of one `HFTeacher.tree_logprobs` forward batch. Symbols: N tokens per
# forward (``max_batch_tokens``, padding included), W the row width (B = N // W rows),
# Wa = W rounded up to MASK_ALIGN on CUDA, L = the model's logits (config.vocab_size), V
# the tokenizer's ids (L >= V), h hidden size, I MLP width, kv = key/value heads *
# head_dim, d = bytes of the model dtype, T the tree nodes one call returns (held by the
# caller as float32 [T, V]).
#
#   mask      = B*W*Wa*d                      (alive during the whole forward)
#   mask_make = B*W*(Wa*d + W)                (while built: the mask and a bool [B, W, W])
#   layer     = N*d*(5h + max(5h + 2kv, 3I))  (at least N*(5h*d + 12h) when d < 4:
#               RMSNorm computes in float32). 5h: the embeddings, the layer's input,
#               residual, normed input (+1 measured); then attention (q, rotary
#               temporaries, k/v repeated to all heads: SDPA gets no GQA with a mask,
#               output and its contiguous copy) or the MLP (act(gate), up, their product)
#   rope      = N*hd*8                        (cos and sin, float32)
#   logits    = N*L*d
#   head      = max(logits + max(3*N*h*d, N*V*4), N*V*4 + S)
#               N*V*4: the batch's float32 log-probs, copied out of the logits (which
#               are then freed); S = 12*V*min(N, max(4, 256 MiB / (12 V))): the
#               log-softmax's float32 exp and float64 copy of a slice of rows
#   held      = (T - N)*V*4                   (log-probs of the call's earlier batches)
#
#   peak(N, W, T) = held + max(mask_make, mask + layer + rope, head)
#
# The layer count does not enter: forwards run with use_cache=False (a KV cache would
# add 2*layers*N*kv*d) and without gradients, so one layer's activations are alive at a
# time. The weights are not included (they are loaded before the plan is made). The
# attention scores are not materialised: SDPA's fused kernels (memory-efficient on CUDA,
# flash on CPU) take the mask; a math fallback would add B*heads*W*W*4 bytes.
LOG_SOFTMAX_SLICE_BYTES = 256 << 20


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that the memory estimate needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    logits: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a `transformers` config (Llama, Qwen2 and alike; the text config of a
        multimodal one)."""
        get_text = getattr(config, "get_text_config", None)
        cfg = get_text() if callable(get_text) else config
        h = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
        return cls(
            hidden_size=h,
            intermediate_size=int(getattr(cfg, "intermediate_size", None) or 4 * h),
            num_layers=int(cfg.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            logits=int(cfg.vocab_size),
        )


def _dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, torch.device("cuda"))
    return int(dtype.itemsize)


def forward_memory_terms(
    shape: ModelShape,
    n_tokens: int,
    vocab_size: int,
    dtype: torch.dtype | str,
    *,
    width: int | None = None,
    call_nodes: int | None = None,
    device_type: str = "cuda",
    slice_bytes: int = LOG_SOFTMAX_SLICE_BYTES,
) -> dict[str, int]:
    """The terms of the memory formula above (bytes) for ``n_tokens`` per forward in
    rows of ``width`` (default: one row of ``n_tokens``, the worst case), a call that
    returns ``call_nodes`` nodes (default ``n_tokens``); ``peak`` is their combination."""
    N = int(n_tokens)
    W = int(width or N)
    B = max(1, N // W)
    align = MASK_ALIGN if device_type == "cuda" else 1
    Wa = -(-W // align) * align
    d = _dtype_bytes(dtype)
    h, mlp = shape.hidden_size, shape.intermediate_size
    kv = shape.num_kv_heads * shape.head_dim
    V, L = int(vocab_size), shape.logits
    mask = B * W * Wa * d
    mask_make = B * W * (Wa * d + W)
    layer = N * d * (5 * h + max(5 * h + 2 * kv, 3 * mlp))
    if d < 4:
        layer = max(layer, N * (5 * h * d + 12 * h))
    rope = N * shape.head_dim * 8
    logits = N * L * d
    slice_rows = min(N, max(4, slice_bytes // (12 * V)))
    softmax = N * V * 4 + slice_rows * V * 12
    head = max(logits + max(3 * N * h * d, N * V * 4), softmax)
    held = max(0, int(call_nodes if call_nodes is not None else N) - N) * V * 4
    peak = held + max(mask_make, mask + layer + rope, head)
    return {
        "mask": mask,
        "mask_make": mask_make,
        "layer": layer,
        "rope": rope,
        "logits": logits,
        "log_softmax": softmax,
        "head": head,
        "held": held,
        "peak": peak,
    }


def estimate_forward_bytes(
    shape: ModelShape | Any,
    n_tokens: int,
    vocab_size: int,
    dtype: torch.dtype | str,
    **kwargs: Any,
) -> int:
    """Peak memory (bytes, weights excluded) of a `tree_logprobs` call's forward batch of
    ``n_tokens``: see `forward_memory_terms` (same keywords; ``shape`` may be a
    `transformers` config)."""
    if not isinstance(shape, ModelShape):
        shape = ModelShape.from_config(shape)
    return forward_memory_terms(shape, n_tokens, vocab_size, dtype, **kwargs)["peak"]


def plan_max_batch_tokens(
    model_config: ModelShape | Any,
    vocab_size: int,
    dtype: torch.dtype | str,
    free_bytes: int,
    safety: float = 0.9,
    *,
    call_batches: float = 1.0,
    width: int | None = None,
    multiple: int = 64,
    max_tokens: int = 1 << 16,
    device_type: str = "cuda",
) -> int:
    """The largest ``max_batch_tokens`` (a multiple of ``multiple``, at most
    ``max_tokens``) whose `estimate_forward_bytes` fits ``safety * free_bytes``, with a
    call returning ``call_batches * N`` nodes and rows of ``width`` (default N: one tree
    may fill a forward). Raises ValueError when not even ``multiple`` tokens fit."""
    shape = (
        model_config
        if isinstance(model_config, ModelShape)
        else ModelShape.from_config(model_config)
    )
    budget = safety * free_bytes

    def estimate(n: int) -> int:
        return estimate_forward_bytes(
            shape,
            n,
            vocab_size,
            dtype,
            width=min(width, n) if width else None,
            call_nodes=math.ceil(call_batches * n),
            device_type=device_type,
        )

    if estimate(multiple) > budget:
        raise ValueError(
            f"{free_bytes / 2**30:.2f} GiB free is too little for a forward of {multiple} "
            f"tokens (estimate {estimate(multiple) / 2**30:.2f} GiB, safety {safety})"
        )
    lo, hi = 1, max(1, max_tokens // multiple)  # the estimate grows with N: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(mid * multiple) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple


def set_deterministic() -> None:
    """Deterministic torch kernels for this process (see `HFTeacher`'s ``deterministic``)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class HFTeacher:
    """A `transformers` causal LM as a teacher.

    Args:
        model: HF model id, local directory, or an already loaded causal LM.
        tokenizer: the teacher tokenizer (anything `transformers.AutoTokenizer` loads, or
            a loaded tokenizer); default: loaded from ``model``.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "auto", "float32", "bfloat16", "float16" (model weights; log-softmax is float32).
        max_batch_tokens: tree nodes (incl. padding) per forward pass, or "auto": on
            CUDA the largest that `plan_max_batch_tokens` fits in the memory free after
            the weights are loaded (``torch.cuda.mem_get_info``), on CPU 2048. The
            resolved number is ``self.max_batch_tokens``.
        start_token: the context token for "start of text": "auto" uses the BOS the
            tokenizer adds by itself if any, else the first document-end token the vocab
            has (``<|endoftext|>`` for Qwen and SmolLM2: documents are separated by it in
            pre-training), else the tokenizer's EOS.
        temperature: logits are divided by it before the softmax.
        gguf_file: load weights from this GGUF file inside ``model`` (a directory).
        auto_call_batches: for ``max_batch_tokens="auto"``: a `tree_logprobs` call returns
            up to this many forward batches' worth of log-probs (the memory plan holds
            them; `SubsetExactScorer.score` passes up to 4 x max_batch_tokens nodes per
            call, the job's `pipeline.scoring.kinds` one batch's worth).
        deterministic: bit-identical reruns on the same hardware and software:
            ``torch.use_deterministic_algorithms(True)`` (process-wide; CUDA scatter-adds
            such as the row phase's ``index_add_`` take their deterministic kernels),
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, no cuDNN autotuning, no TF32. Slower on
            CUDA; on CPU the kernels are deterministic already.
    """

    # bytes of float32 exp + float64 copy per slice of rows in `_log_softmax`
    log_softmax_slice_bytes = LOG_SOFTMAX_SLICE_BYTES
    # the dtype of the returned log-probs (`_log_softmax_` fills a tensor of it)
    logprob_dtype = torch.float32
    # `prefix_tree_logprobs`: bytes of prefix keys/values kept (settable; on CUDA the
    # max_batch_tokens="auto" plan reserves it, as set at construction); call counters
    prefix_cache_bytes: int = 1 << 30
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    # tuple(prefix) -> (keys/values per layer, their bytes), least recently used first
    _prefix_lru: OrderedDict[
        tuple[int, ...], tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], int]
    ]
    _prefix_lru_bytes: int = 0

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_batch_tokens: int | str = 2048,
        start_token: str | int = "auto",
        temperature: float = 1.0,
        revision: str | None = None,
        gguf_file: str | None = None,
        auto_call_batches: float = 4.0,
        deterministic: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.deterministic = deterministic
        if deterministic:
            set_deterministic()

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
        self.max_batch_tokens = self._resolve_max_batch_tokens(max_batch_tokens, auto_call_batches)
        self.temperature = float(temperature)
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        # Row width at which attention costs about as much as the rest of a layer.
        self.attention_scale = 8 * int(getattr(self.model.config, "hidden_size", 512))
        self.start_ids = self._start_ids(start_token)
        self.forwarded_tokens = 0  # incl. padding, for benchmarks
        self.prefix_cache_hits = 0
        self.prefix_cache_misses = 0
        self._prefix_lru = OrderedDict()
        self._prefix_lru_bytes = 0

    def _resolve_max_batch_tokens(self, value: int | str, call_batches: float) -> int:
        if value != "auto":
            if isinstance(value, str) and not value.isdigit():
                raise ValueError(f"max_batch_tokens must be an int or 'auto', not {value!r}")
            return int(value)
        if self.device.type != "cuda":
            log.info("teacher max_batch_tokens=auto: 2048 on %s", self.device)
            return 2048
        free, total = torch.cuda.mem_get_info(self.device)
        # the keys/values `prefix_tree_logprobs` may keep (the general scorer's documents)
        reserve = int(self.prefix_cache_bytes)
        free = max(0, free - reserve)
        shape = ModelShape.from_config(self.model.config)
        n = plan_max_batch_tokens(
            shape, self.vocab_size, self.dtype, free, call_batches=call_batches
        )
        terms = forward_memory_terms(
            shape, n, self.vocab_size, self.dtype, call_nodes=math.ceil(call_batches * n)
        )
        log.info(
            "teacher max_batch_tokens=auto: %d (free %.2f of %.2f GiB after the weights "
            "and %.2f GiB kept for prefix caches, safety 0.9; %s, vocab %d, dtype %s, call "
            "holds %g batches; estimated peak %.2f GiB: %s)",
            n,
            free / 2**30,
            total / 2**30,
            reserve / 2**30,
            shape,
            self.vocab_size,
            self.dtype,
            call_batches,
            terms["peak"] / 2**30,
            ", ".join(f"{k} {v / 2**30:.2f}" for k, v in terms.items() if k != "peak"),
        )
        return n

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
        float32 log-probs [num_nodes, vocab_size] after every node, on ``self.device``
        (views of one tensor per forward: `tree_logprob_batches`)."""
        out: list[torch.Tensor | None] = [None] * len(trees)
        for lp, first in self.tree_logprob_batches(trees):
            for ti, row in first.items():
                out[ti] = lp[row : row + len(trees[ti][0])]
        return [o for o in out if o is not None]

    @torch.inference_mode()
    def tree_logprob_batches(
        self, trees: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> Iterator[tuple[torch.Tensor, dict[int, int]]]:
        """The trees' log-probs forward by forward: per forward batch of `_plan`, the
        float32 log-probs [nodes of its trees, vocab_size] (one tensor) and each of its
        trees' first row. A consumer that drops them before asking for the next holds
        one forward's log-probs at a time (`forward_memory_terms`)."""
        s = len(self.start_ids)
        sizes = [len(t) - 1 + s for t, _ in trees]
        for n in sizes:
            if n > self.max_batch_tokens:
                raise ValueError(
                    f"a context tree of {n} tokens exceeds max_batch_tokens={self.max_batch_tokens}; "
                    "chunk the document or raise the limit"
                )
        for rows, width in self._plan(sizes):
            yield self._forward_rows(trees, rows, width)

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

    def _row_inputs(
        self,
        trees: Sequence[tuple[Sequence[int], Sequence[int]]],
        group: list[list[int]],
        width: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
        """Host side of a forward batch, O(B * width): token ids and position ids [B, W]
        (int64), the Euler intervals tin/tout [B, W] (int32) from which the device builds
        the tree mask (`tree_attention_mask`), and where each tree's nodes are:
        (tree, row, offset of its first node's logits, nodes)."""
        s = len(self.start_ids)
        B = len(group)
        ids = np.zeros((B, width), np.int64)
        pos = np.zeros((B, width), np.int64)
        tin_all = np.empty((B, width), np.int32)
        tout_all = np.empty((B, width), np.int32)
        where: list[tuple[int, int, int, int]] = []  # (tree, row, offset, n)
        for b, members in enumerate(group):
            off = 0
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
                # the row's clock is its offset: trees in a row get disjoint intervals
                tin_all[b, off : off + m] = tin + off
                tout_all[b, off : off + m] = tout + off
                where.append((ti, b, off + s - 1, n))
                off += m
            # padding: each pad position attends to itself only
            tin_all[b, off:] = np.arange(off, width)
            tout_all[b, off:] = tin_all[b, off:] + 1
        return ids, pos, tin_all, tout_all, where

    def _forward_rows(
        self,
        trees: Sequence[tuple[Sequence[int], Sequence[int]]],
        group: list[list[int]],
        width: int,
    ) -> tuple[torch.Tensor, dict[int, int]]:
        """One forward batch: the log-probs of its trees' nodes (one float32 tensor, trees
        in `_row_inputs` order) and each tree's first row."""
        ids, pos, tin, tout, where = self._row_inputs(trees, group, width)
        cuda = self.device.type == "cuda"
        host = [torch.from_numpy(a) for a in (ids, pos, tin, tout)]
        if cuda:  # pinned, so that the copies are asynchronous
            host = [t.pin_memory() for t in host]
        ids_d, pos_d, tin_d, tout_d = (t.to(self.device, non_blocking=cuda) for t in host)
        mask = tree_attention_mask(tin_d, tout_d, self.dtype, align=MASK_ALIGN if cuda else 1)
        del tin_d, tout_d
        logits = self.model(
            input_ids=ids_d, attention_mask=mask, position_ids=pos_d, use_cache=False
        ).logits
        del mask, ids_d, pos_d
        self.forwarded_tokens += len(group) * width
        total = sum(n for *_, n in where)
        out = torch.empty((total, self.vocab_size), dtype=self.logprob_dtype, device=logits.device)
        first: dict[int, int] = {}
        row = 0
        for ti, b, start, n in where:
            out[row : row + n].copy_(logits[b, start : start + n, : self.vocab_size])
            first[ti] = row
            row += n
        del logits
        return self._log_softmax_(out), first

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """`_log_softmax_` of a float32 copy of ``logits``' real ids."""
        lg = logits[..., : self.vocab_size]
        out = torch.empty(lg.shape, dtype=self.logprob_dtype, device=lg.device)
        out.copy_(lg)
        return self._log_softmax_(out)

    def _log_softmax_(self, out: torch.Tensor) -> torch.Tensor:
        """float32 log-softmax over the real ids; the normaliser is summed in float64 so
        that exp(row) sums to 1 within ~1e-7 (float32 summation leaves ~1e-5).

        Memory: the float32 result [n, V] plus, per slice of rows, the float32 exp and its
        float64 copy (``torch.sum(x, dtype=float64)`` copies ``x`` to float64 too), at most
        ``log_softmax_slice_bytes`` (12 bytes per entry; at least 4 rows). Slices are of
        equal size (at least 2 rows when n >= 2), so that on CPU every row is summed in
        the same order as one reduction over all rows would (bit-identical)."""
        if self.temperature != 1.0:
            out.div_(self.temperature)
        vocab = out.shape[-1]
        flat = out.view(-1, vocab)
        n = flat.shape[0]
        if n == 0:
            return out
        mx = flat.max(dim=-1, keepdim=True).values
        lse = torch.empty_like(mx)
        max_rows = max(4, self.log_softmax_slice_bytes // (12 * vocab))
        slices = -(-n // max_rows)
        bounds = [n * k // slices for k in range(slices + 1)]
        for a, b in itertools.pairwise(bounds):
            e = torch.sub(flat[a:b], mx[a:b]).exp_()
            lse[a:b] = torch.log(e.double().sum(dim=-1, keepdim=True)).float() + mx[a:b]
            del e
        flat.sub_(lse)
        return out

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
                input_ids=ids.to(self.device), attention_mask=att.to(self.device), use_cache=False
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

    # ------------------------------------------------------ prefix trees (KV cache)
    @torch.inference_mode()
    def prefix_tree_logprobs(self, items: Sequence[PrefixTree]) -> list[torch.Tensor]:
        """Per item (`pipeline.scoring.trees.PrefixTree`), the float32 log-probs
        [len(points) + len(tokens), vocab_size] on ``self.device``: after each point p
        (context start + prefix[:p]), then after each new node (start + prefix[:attach of
        its first ancestor] + the tokens on its path). The same numbers as `tree_logprobs`
        over the explicit prefix trees (the fallback of
        `pipeline.scoring.trees.prefix_tree_logprobs`) within rounding.

        Cache: a prefix's keys and values are computed once, by a causal forward of
        start + prefix (``use_cache=True``; in chunks of ``max_batch_tokens`` that feed
        the cache on), and kept in an LRU keyed by ``tuple(prefix)`` and bounded by
        ``prefix_cache_bytes`` (the bytes of the kept keys and values; a prefix larger
        than the budget serves its call and is dropped; `clear_prefix_cache`). The
        points' rows come from that forward (only their logits are computed:
        ``logits_to_keep``). A later call with the same prefix (``prefix_cache_hits``)
        forwards only its new nodes against the kept keys/values.

        Nodes: forwards of at most ``max_batch_tokens`` new positions, each a single row
        (no padding) with a [1, 1, m, S + P + m] mask (`prefix_node_mask`; S start ids,
        P the prefix): node v sees the kept positions < S + attach (of its first
        ancestor), its ancestors and itself, at position id S + attach + depth - 1 (as in
        the tree forward). A forward takes whole root subtrees, in node order; a subtree
        over ``max_batch_tokens`` nodes raises ValueError. The kept keys/values are not
        modified (each forward's cache is a copy, `DynamicCache(ddp_cache_data=...)`).

        Points on a cached prefix are forwarded again as one-token nodes (position S + p -
        1 of start + prefix, seeing the kept positions before it): the log-probs of
        every prefix position are not kept (P x V float32: 300 MB for P = 500 and a 150k
        vocab), nor its hidden states (the output head of some models is more than one
        linear map).

        Items run one after another (no batching across items). ``forwarded_tokens``
        counts the S + P positions of a prefix forward and the new positions (nodes and
        re-forwarded points). A context over ``max_positions`` tokens raises ValueError.
        Models that are not a `transformers` `PreTrainedModel`, or have other than
        full-attention layers (sliding windows), take `tree_logprobs` over the explicit
        prefix trees instead (no cache). The kept keys/values belong to the weights,
        dtype and start ids they were made with: `clear_prefix_cache` after changing
        any of them.
        """
        if not self._prefix_cache_supported():
            return self._prefix_tree_fallback(items)
        return [self._prefix_item(it) for it in items]

    def clear_prefix_cache(self) -> None:
        """Drop every kept prefix's keys and values (`prefix_tree_logprobs`)."""
        self._prefix_lru = OrderedDict()
        self._prefix_lru_bytes = 0

    def prefix_cache_stats(self) -> dict[str, int]:
        """Kept prefixes, their bytes, the budget, and the hit/miss counters."""
        return {
            "entries": len(self._prefix_lru_map()),
            "bytes": self._prefix_lru_bytes,
            "budget": int(self.prefix_cache_bytes),
            "hits": self.prefix_cache_hits,
            "misses": self.prefix_cache_misses,
        }

    def _prefix_lru_map(
        self,
    ) -> OrderedDict[tuple[int, ...], tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], int]]:
        lru = self.__dict__.get("_prefix_lru")
        if lru is None:  # an instance made without __init__
            lru = self._prefix_lru = OrderedDict()
        return lru

    def _prefix_cache_supported(self) -> bool:
        ok = self.__dict__.get("_prefix_cache_ok")
        if ok is None:
            from transformers import PreTrainedModel

            ok = isinstance(self.model, PreTrainedModel)
            if ok:
                cfg = self.model.config
                get_text = getattr(cfg, "get_text_config", None)
                cfg = get_text() if callable(get_text) else cfg
                types = getattr(cfg, "layer_types", None) or ()
                ok = all(t == "full_attention" for t in types)
            self._prefix_cache_ok = ok
        return bool(ok)

    def _keeps_logits(self) -> bool:
        """Whether the model's forward takes ``logits_to_keep``."""
        keeps = self.__dict__.get("_logits_to_keep")
        if keeps is None:
            import inspect

            keeps = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            self._logits_to_keep = keeps
        return bool(keeps)

    def _prefix_tree_fallback(self, items: Sequence[PrefixTree]) -> list[torch.Tensor]:
        """`prefix_tree_logprobs` by `tree_logprobs` over one explicit prefix tree per
        item (the prefix path up to the last point or attach, then the nodes)."""
        from pipeline.scoring.trees import explicit_prefix_trees

        trees, rows = explicit_prefix_trees(items)
        out = self.tree_logprobs(trees)
        return [
            lp[torch.as_tensor(r, dtype=torch.long, device=lp.device)]
            for lp, r in zip(out, rows, strict=True)
        ]

    def _prefix_item(self, it: PrefixTree) -> torch.Tensor:
        S = len(self.start_ids)
        prefix = tuple(int(t) for t in it.prefix)
        P = len(prefix)
        points = [int(p) for p in it.points]
        n = len(it.tokens)
        attach = [0] * n  # of the node's first ancestor
        depth = [0] * n  # 1 for a node without a parent
        for v, par in enumerate(it.parents):
            if par < 0:
                attach[v], depth[v] = int(it.attach[v]), 1
            else:
                attach[v], depth[v] = attach[par], depth[par] + 1
        longest = max([S + P, *(S + a + d for a, d in zip(attach, depth, strict=True))])
        if longest > self.max_positions:
            raise ValueError(
                f"a context of {longest} tokens exceeds the teacher's {self.max_positions} "
                "positions; chunk the document"
            )
        out = torch.empty(
            (len(points) + n, self.vocab_size), dtype=self.logprob_dtype, device=self.device
        )
        # new positions: (output row, token, position id, kept positions seen, parent or -1)
        new: list[tuple[int, int, int, int, int]] = []
        lru = self._prefix_lru_map()
        kept = lru.get(prefix)
        if kept is None:
            self.prefix_cache_misses += 1
            kv = self._forward_prefix(prefix, points, out)
            self._prefix_cache_put(prefix, kv)
        else:
            self.prefix_cache_hits += 1
            lru.move_to_end(prefix)
            kv = kept[0]
            full = (*self.start_ids, *prefix)
            new.extend(
                (r, int(full[S + p - 1]), S + p - 1, S + p - 1, -1) for r, p in enumerate(points)
            )
        base = len(new)
        for v, par in enumerate(it.parents):
            a = attach[v]
            new.append(
                (
                    len(points) + v,
                    int(it.tokens[v]),
                    S + a + depth[v] - 1,
                    S + a,
                    -1 if par < 0 else base + par,
                )
            )
        if new:
            self._forward_prefix_nodes(kv, S + P, new, out)
        return self._log_softmax_(out)

    def _prefix_cache_put(
        self, key: tuple[int, ...], kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    ) -> None:
        nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        budget = int(self.prefix_cache_bytes)
        lru = self._prefix_lru_map()
        if nbytes > budget:
            return
        while lru and self._prefix_lru_bytes + nbytes > budget:
            _, (_, old) = lru.popitem(last=False)
            self._prefix_lru_bytes -= old
        lru[key] = (kv, nbytes)
        self._prefix_lru_bytes += nbytes

    def _forward_prefix(
        self, prefix: tuple[int, ...], points: list[int], out: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Causal forward of start + prefix with a KV cache, in chunks of
        ``max_batch_tokens``; writes the points' logits into their rows of ``out``.
        Returns the keys and values per layer ([1, kv heads, S + P, head dim] each)."""
        from transformers import DynamicCache

        S = len(self.start_ids)
        full = [*self.start_ids, *prefix]
        ids = torch.as_tensor(full, dtype=torch.long).to(self.device)
        want = sorted((S - 1 + p, r) for r, p in enumerate(points))
        cache = DynamicCache()  # no config: full (not sliding) layers
        step = max(1, int(self.max_batch_tokens))
        for a in range(0, len(full), step):
            b = min(a + step, len(full))
            sel = [(x - a, r) for x, r in want if a <= x < b]
            keep = torch.as_tensor([x for x, _ in sel], dtype=torch.long).to(self.device)
            kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._keeps_logits() else {}
            logits = self.model(
                input_ids=ids[None, a:b],
                position_ids=torch.arange(a, b, device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            ).logits
            self.forwarded_tokens += b - a
            if sel:
                lg = logits[0] if kwargs else logits[0, keep]
                rows = torch.as_tensor([r for _, r in sel], dtype=torch.long).to(self.device)
                out[rows] = lg[:, : self.vocab_size].to(out.dtype)
            del logits
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in cache.layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                raise RuntimeError(f"unsupported KV cache layer {type(layer).__name__}")
            if k.shape[-2] != len(full) or v.shape[-2] != len(full):
                raise RuntimeError("the model's KV cache does not hold every prefix position")
            kv.append((k, v))
        if not kv:
            raise RuntimeError("the model's forward filled no KV cache")
        return tuple(kv)

    def _forward_prefix_nodes(
        self,
        kv: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        cached: int,
        new: list[tuple[int, int, int, int, int]],
        out: torch.Tensor,
    ) -> None:
        """Forward the new positions (`_prefix_item`'s tuples; parents before children)
        against the kept keys/values ``kv`` of ``cached`` positions, whole root subtrees
        per forward of at most ``max_batch_tokens``; writes their logits into ``out``."""
        from transformers import DynamicCache

        limit = max(1, int(self.max_batch_tokens))
        root = [0] * len(new)
        groups: dict[int, list[int]] = {}
        for j, (*_, par) in enumerate(new):
            root[j] = j if par < 0 else root[par]
            groups.setdefault(root[j], []).append(j)
        chunks: list[list[int]] = []
        cur: list[int] = []
        for g in groups.values():
            if len(g) > limit:
                raise ValueError(
                    f"a subtree of {len(g)} nodes exceeds max_batch_tokens={limit}; "
                    "split the nodes or raise the limit"
                )
            if cur and len(cur) + len(g) > limit:
                chunks.append(cur)
                cur = []
            cur.extend(g)
        if cur:
            chunks.append(cur)
        cuda = self.device.type == "cuda"
        for chunk in chunks:
            local = {j: k for k, j in enumerate(chunk)}
            forest = [-1] + [0 if new[j][4] < 0 else local[new[j][4]] + 1 for j in chunk]
            tin, tout, _ = _euler_intervals(forest)
            host = np.array(
                [[new[j][1], new[j][2], new[j][3], new[j][0]] for j in chunk], dtype=np.int64
            )
            ids, pos, vis, rows = torch.from_numpy(host).to(self.device).unbind(1)
            tin_d, tout_d = (torch.from_numpy(x[1:]).to(self.device) for x in (tin, tout))
            mask = prefix_node_mask(
                vis, tin_d, tout_d, cached, self.dtype, align=MASK_ALIGN if cuda else 1
            )
            logits = self.model(
                input_ids=ids[None],
                attention_mask=mask,
                position_ids=pos[None],
                past_key_values=DynamicCache(ddp_cache_data=kv),
                use_cache=True,
            ).logits
            del mask
            self.forwarded_tokens += len(chunk)
            out[rows] = logits[0, :, : self.vocab_size].to(out.dtype)
            del logits
