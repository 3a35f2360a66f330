"""What a layer's state shares with the others: the keys and values a cache update hands over to
the attention step that follows, and the in-place window shift of a fixed-shape step."""

from __future__ import annotations

import torch


def shift_in(rows: torch.Tensor, new: torch.Tensor) -> None:
    """In place, in `rows` [B, H, N, ...]: the oldest T rows leave, the rest move to the front,
    the T rows of `new` take the end (a fixed-shape window step)."""
    tokens = new.shape[2]
    rows[:, :, :-tokens] = rows[:, :, tokens:].clone()
    rows[:, :, -tokens:] = new


class PendingKV:
    """Keys/values handed over by the cache's `update`, consumed by the next `attend`."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def put(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k is not None:
            raise RuntimeError(
                "agentmem: keys were stored twice without an attention step in between; "
                "each layer's cache update must be followed by its attention"
            )
        self.k, self.v = k, v

    def clear(self) -> None:
        """Forget keys stored by a step that failed before its attention ran."""
        self.k = self.v = None

    def take(self, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.k.shape[2] != n_queries:
            raise RuntimeError(
                "agentmem: attention called without the matching cache update "
                "(the model must be wrapped with agentmem.wrap and given an AgentMemCache)"
            )
        k, v = self.k, self.v
        self.k = self.v = None
        return k, v
