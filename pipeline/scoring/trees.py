"""Prefix trees of teacher contexts, shared by the scorers: merging the trees of many
texts into as few as fit one forward (`merge_context_trees`), grouping them into teacher
calls (`_batches`), and the teacher call itself (`teacher_tree_logprobs`: a
`pipeline.scoring.protocol.TreeTeacher`'s tree forward, or one context at a time)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.scoring.protocol import Teacher


class TeacherTree(Protocol):
    """What `merge_context_trees` reads of a document: its context path and its local
    nodes (``tokens``/``parents``, node 0 the end of the context)."""

    @property
    def context(self) -> Sequence[int]: ...
    @property
    def tokens(self) -> Sequence[int]: ...
    @property
    def parents(self) -> Sequence[int]: ...
    @property
    def num_nodes(self) -> int: ...


def merge_context_trees(
    docs: Sequence[TeacherTree], max_nodes: int
) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, list[int]]]]:
    """Merge the teacher trees of ``docs`` (context path + local nodes) into prefix trees
    of at most ``max_nodes`` nodes each (root included), deduplicating nodes by
    (parent, token). Documents are taken in order of their contexts so that documents
    sharing a context prefix land in the same tree; a tree that would overflow is closed
    and the document starts a new one (repeating its context path there).

    Returns the trees (tokens, parents; node 0 the start of text) and, per document,
    (its tree, the tree node of each of its local nodes).
    """
    trees: list[tuple[list[int], list[int]]] = []
    where: list[tuple[int, list[int]]] = [(-1, [])] * len(docs)
    tokens: list[int] = [-1]
    parents: list[int] = [-1]
    index: dict[tuple[int, int], int] = {}

    def insert(doc: TeacherTree) -> tuple[list[int], list[tuple[int, int]]]:
        added: list[tuple[int, int]] = []

        def node(parent: int, tok: int) -> int:
            key = (parent, tok)
            v = index.get(key)
            if v is None:
                v = len(tokens)
                index[key] = v
                tokens.append(tok)
                parents.append(parent)
                added.append(key)
            return v

        v = 0
        for t in doc.context:
            v = node(v, int(t))
        local = [v]
        for u in range(1, doc.num_nodes):
            local.append(node(local[doc.parents[u]], int(doc.tokens[u])))
        return local, added

    for i in sorted(range(len(docs)), key=lambda i: tuple(docs[i].context)):
        before = len(tokens)
        local, added = insert(docs[i])
        if len(tokens) > max_nodes and before > 1:  # overflow: undo, close, start anew
            for key in added:
                del index[key]
            del tokens[before:], parents[before:]
            trees.append((tokens, parents))
            tokens, parents, index = [-1], [-1], {}
            local, _ = insert(docs[i])
        where[i] = (len(trees), local)
    if docs:  # every closed tree was followed by a document: the last one is not empty
        trees.append((tokens, parents))
    return trees, where


def _batches(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Group item indices so that each group's total size stays within budget (items
    larger than the budget go alone)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    out: list[list[int]] = []
    cur: list[int] = []
    tot = 0
    for i in order:
        if cur and tot + sizes[i] > budget:
            out.append(cur)
            cur, tot = [], 0
        cur.append(i)
        tot += sizes[i]
    if cur:
        out.append(cur)
    return out


def teacher_tree_logprobs(
    teacher: Teacher, trees: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[torch.Tensor]:
    """Log-probs after every node of every tree ([num_nodes, V] each).

    A tree is (tokens, parents) with node 0 the start of text. Uses the teacher's
    ``tree_logprobs`` when it has one, else one ``next_token_logprobs`` call over the
    explicit contexts of all nodes.
    """
    tree_logprobs = getattr(teacher, "tree_logprobs", None)  # a `TreeTeacher`
    if tree_logprobs is not None:
        return list(tree_logprobs(trees))
    contexts: list[tuple[int, ...]] = []
    sizes = []
    for tokens, parents in trees:
        ctx: list[tuple[int, ...]] = [()]
        for v in range(1, len(tokens)):
            ctx.append((*ctx[parents[v]], int(tokens[v])))
        contexts.extend(ctx)
        sizes.append(len(ctx))
    lp = teacher.next_token_logprobs(contexts)
    lp_t = torch.as_tensor(np.asarray(lp)) if not isinstance(lp, torch.Tensor) else lp
    return list(torch.split(lp_t, sizes))


def teacher_tree_batches(
    teacher: Teacher, trees: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> Iterator[tuple[torch.Tensor, dict[int, int]]]:
    """The log-probs of ``trees`` forward by forward: yields ``(log-probs [nodes, V], {tree
    index: its first row})`` for the trees of each teacher forward, so that a row phase
    can run over all of them at once and the log-probs go before the next forward. Uses
    the teacher's ``tree_logprob_batches`` when it has one (`pipeline.teacher.HFTeacher`),
    else one `teacher_tree_logprobs` call, concatenated."""
    batches = getattr(teacher, "tree_logprob_batches", None)
    if batches is not None:
        yield from batches(trees)
        return
    if not trees:
        return
    logps = teacher_tree_logprobs(teacher, trees)
    first = np.concatenate([[0], np.cumsum([len(lp) for lp in logps])])
    lp = logps[0] if len(logps) == 1 else torch.cat([torch.as_tensor(x) for x in logps])
    yield lp, {t: int(first[t]) for t in range(len(trees))}


@dataclass(frozen=True)
class PrefixTree:
    """Teacher contexts that continue one shared prefix (a document's canonical teacher
    ids), for `prefix_tree_logprobs`.

    ``prefix``: teacher ids (no start-of-text ids). ``points``: prefix lengths ``p``
    whose next-token log-probs are wanted (after ``start + prefix[:p]``). New nodes
    ``v = 0..n-1``: token ``tokens[v]``, parent ``parents[v]`` (an earlier node, or -1);
    a node without a parent continues ``prefix[:attach[v]]`` (``attach`` is read only
    for those). A node's context is ``start + prefix[:attach of its first ancestor] +``
    the tokens on its path."""

    prefix: tuple[int, ...]
    points: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    attach: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.parents) != n or len(self.attach) != n:
            raise ValueError("tokens, parents and attach must have one entry per node")
        P = len(self.prefix)
        if any(not 0 <= p <= P for p in self.points):
            raise ValueError(f"points must lie in [0, {P}]")
        for v, (par, a) in enumerate(zip(self.parents, self.attach, strict=True)):
            if not -1 <= par < v:
                raise ValueError(f"node {v}: parent {par} is not an earlier node or -1")
            if par == -1 and not 0 <= a <= P:
                raise ValueError(f"node {v}: attach {a} is not in [0, {P}]")

    @property
    def rows(self) -> int:
        return len(self.points) + len(self.tokens)


def explicit_prefix_trees(
    items: Sequence[PrefixTree],
) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    """Each item as a plain prefix tree (tokens, parents; node 0 the start of text): its
    prefix path up to the last point or attach it uses, then its nodes; and per item the
    tree node of each of its rows (points, then nodes)."""
    trees: list[tuple[list[int], list[int]]] = []
    rows: list[list[int]] = []
    for it in items:
        tokens, parents = [-1], [-1]
        chain = [0]  # chain[p]: the tree node after prefix[:p]
        need = max(
            [*it.points, *(a for a, par in zip(it.attach, it.parents, strict=True) if par == -1)],
            default=0,
        )
        for t in it.prefix[:need]:
            tokens.append(int(t))
            parents.append(chain[-1])
            chain.append(len(tokens) - 1)
        node: list[int] = []
        for v in range(len(it.tokens)):
            par = it.parents[v]
            tokens.append(int(it.tokens[v]))
            parents.append(chain[it.attach[v]] if par == -1 else node[par])
            node.append(len(tokens) - 1)
        trees.append((tokens, parents))
        rows.append([chain[p] for p in it.points] + node)
    return trees, rows


def _forwarded(teacher: Teacher) -> int | None:
    """The teacher's count of forwarded positions, where it keeps one."""
    n = getattr(teacher, "forwarded_tokens", None)
    return None if n is None else int(n)


def prefix_tree_logprobs(
    teacher: Teacher, items: Sequence[PrefixTree], stats: dict[str, int] | None = None
) -> list[torch.Tensor]:
    """Per item, the log-probs ``[len(points) + len(tokens), V]`` after each of its
    points, then after each of its nodes. Uses the teacher's ``prefix_tree_logprobs``
    when it has one (`pipeline.teacher.HFTeacher`: the prefix's keys and values are
    computed once and kept for later calls with the same prefix, so a call forwards
    only the new nodes), else `teacher_tree_logprobs` over one prefix tree per item
    (prefix path + nodes, the prefix forwarded again in every call).

    ``stats["positions"]`` is increased by the positions the teacher forwarded: its
    ``forwarded_tokens`` counter where it has one (padding included), else the tree
    nodes sent."""
    native = getattr(teacher, "prefix_tree_logprobs", None)
    counter = _forwarded(teacher)
    if native is not None:
        out = list(native(items))
        if stats is not None and counter is not None:
            stats["positions"] = stats.get("positions", 0) + (_forwarded(teacher) or 0) - counter
        return out
    trees, rows = explicit_prefix_trees(items)
    out = teacher_tree_logprobs(teacher, trees)
    if stats is not None:
        if counter is not None:
            n = (_forwarded(teacher) or 0) - counter
        else:
            n = sum(len(t) for t, _ in trees)
        stats["positions"] = stats.get("positions", 0) + n
    return [
        lp[torch.as_tensor(r, dtype=torch.long, device=lp.device)]
        for lp, r in zip(out, rows, strict=True)
    ]
