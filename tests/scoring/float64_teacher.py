"""A float64 `HFTeacher` for tests that compare two computations of the same teacher
numbers: a tree-packed forward against one-context or plain causal forwards, trees
packed differently, several scorers' forwards of the same contexts.

Such forwards add the same terms in different orders (the row width, the kernels and
the thread count decide the order), so their results differ by rounding. In float32 the
measured differences per entry reach 1.8e-5 (SmolLM2, tree-packed against one-context
forwards: a probability, where a comparison within 1e-5 passed on one machine and failed
on others; tiny models: 1.6e-5 in a log-prob of magnitude 47, 1.05e-5 with one torch
thread and 1.5e-5 with two). A reordering moves a result by the unit roundoff times a
factor set by the model and the inputs (how many terms, how large), whatever the
machine; float64's unit roundoff (2^-53) is 2^29 = 5.4e8 times finer than float32's
(2^-24), so those differences scale to ~3e-14, and the float64 differences measured for
the same comparisons are at most 6e-14 per entry (1 and 2 torch threads alike).
`FLOAT64_TOL` = 1e-9 is over 1e4 times that: a machine-independent bound with a large
safety factor, still far below any error that a wrong mask, cover or row would make.

`HFTeacher` computes its log-softmax in float32 whatever the model's dtype (that is what
it returns to the scorers), so this subclass keeps the float64 logits (`logprob_dtype`). The scorers take
float64 log-probs (the brute-force tests' `PerfectTeacher` gives them float64 too).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.teacher import HFTeacher

# Bound for one entry (a probability or log-prob) computed along two float64 paths; a
# sum of n such entries gets n times it (see the module docstring).
FLOAT64_TOL = 1e-9


class Float64Teacher(HFTeacher):
    """`HFTeacher` with float64 weights (a loaded ``model`` is cast in place, as
    `HFTeacher` does) and float64 log-probs."""

    def __init__(self, model: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, dtype=torch.float64, **kwargs)

    logprob_dtype = torch.float64

    def _log_softmax_(self, out: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            out.div_(self.temperature)
        return torch.log_softmax(out, dim=-1)
