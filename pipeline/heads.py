"""A light byte-level decoder head for byte-level distillation (see
`pipeline.loss.byte_head_loss`).

    head = ByteHead(model.config.hidden_size, m=4)
    hidden = student(batch["input_ids"], output_hidden_states=True).hidden_states[-1]
    byte_logits = head(hidden, batch["byte_next"])  # [B, L, m, 257]
    loss = byte_head_loss(byte_logits, batch)

At student position ``t`` the head predicts the ``m`` bytes that follow the end of student
token ``t``: offset 0 from the hidden state alone, offset ``j > 0`` also from the actual
bytes at offsets ``0 .. j - 1`` (teacher forcing on ``byte_next``; -1, "no byte", is a
padding input). A one-layer GRU runs over the ``m`` offsets of every position, its
initial state projected from the hidden state:

    h_0  = tanh(W_init hidden[t])
    x_0  = e_start,  x_j = e(byte_next[t, j - 1])      (e(-1) = 0, the padding embedding)
    h_j+1 = GRU(x_j, h_j),   logits[t, j] = W_out h_j+1

so ``logits[t, j]`` depends on ``hidden[t]`` and ``byte_next[t, :j]`` only. Symbols follow
the byte vocabulary of the targets: 0..255 byte values, 256 end-of-text, 257+ special
tokens (``vocab = 257 + n_specials``).
"""

from __future__ import annotations

import torch
from torch import nn


class ByteHead(nn.Module):
    """Predicts ``m`` next-byte distributions per position from a hidden state.

    Args:
        hidden_size: width of the student's hidden states.
        m: number of byte offsets predicted per position.
        vocab: byte-vocabulary size, ``>= 257`` (256 bytes + end-of-text + specials).
        byte_dim: width of the byte (input) embeddings.
        state_dim: GRU state width (default ``4 * byte_dim``).

    Parameters: ``hidden_size * state_dim`` (the projection) + a one-layer GRU
    (``3 * state_dim * (byte_dim + state_dim)``) + ``state_dim * vocab`` (the output) +
    ``(vocab + 2) * byte_dim`` (embeddings): about 0.6M for ``hidden_size=1024`` and the
    defaults.
    """

    def __init__(
        self,
        hidden_size: int,
        m: int,
        vocab: int = 257,
        byte_dim: int = 64,
        state_dim: int | None = None,
    ) -> None:
        super().__init__()
        if m < 1:
            raise ValueError(f"m must be >= 1, not {m}")
        if vocab < 257:
            raise ValueError(f"vocab must be >= 257 (256 bytes + end-of-text), not {vocab}")
        self.m = m
        self.vocab = vocab
        state = 4 * byte_dim if state_dim is None else state_dim
        self.pad_id = vocab  # the input for "no byte" (-1)
        self.start_id = vocab + 1  # the input of offset 0
        self.init_state = nn.Linear(hidden_size, state)
        self.embed = nn.Embedding(vocab + 2, byte_dim, padding_idx=self.pad_id)
        self.gru = nn.GRU(byte_dim, state, batch_first=True)
        self.out = nn.Linear(state, vocab)

    def forward(self, hidden: torch.Tensor, byte_next: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, L, H], ``byte_next`` [B, L, m] int (the actual symbol at each
        offset, -1 where none) -> logits [B, L, m, vocab]. ``byte_next[..., m - 1]`` is not
        read (no offset comes after it)."""
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, L, H], got {tuple(hidden.shape)}")
        batch, length, _ = hidden.shape
        if tuple(byte_next.shape) != (batch, length, self.m):
            raise ValueError(
                f"byte_next must be [B, L, m] = {(batch, length, self.m)}, "
                f"got {tuple(byte_next.shape)}"
            )
        prev = byte_next[..., : self.m - 1].to(hidden.device).long()
        if prev.numel() and int(prev.max()) >= self.vocab:
            raise ValueError(f"byte_next has symbol {int(prev.max())} >= vocab {self.vocab}")
        prev = torch.where(prev < 0, torch.full_like(prev, self.pad_id), prev)
        start = torch.full((batch, length, 1), self.start_id, dtype=torch.long, device=prev.device)
        x = self.embed(torch.cat([start, prev], dim=-1)).flatten(0, 1)  # [B*L, m, byte_dim]
        h0 = torch.tanh(self.init_state(hidden.to(self.init_state.weight.dtype)))
        out, _ = self.gru(x, h0.flatten(0, 1).unsqueeze(0).contiguous())  # [B*L, m, state]
        return self.out(out).view(batch, length, self.m, self.vocab)


__all__ = ["ByteHead"]
