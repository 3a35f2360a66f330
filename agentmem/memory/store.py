"""Append-only storage of a layer's memory units: their keys, values and representatives.

Units are contiguous in the stream: unit i holds tokens from `start + i * unit_size` on, so spans
are derived, never stored. Buffers grow by doubling, so appending is amortised O(1) and a step's
cost does not grow with what came before.
"""

from __future__ import annotations

import torch


class GrowingTensor:
    """A tensor that grows along dim 2 (`[B, H, n, ...]`), with spare capacity."""

    def __init__(self) -> None:
        self._data: torch.Tensor | None = None
        self.length = 0

    @classmethod
    def holding(cls, x: torch.Tensor | None) -> GrowingTensor:
        """A tensor whose entries are `x` [B, H, n, ...] (taken as storage, not copied)."""
        grown = cls()
        if x is not None:
            grown._data, grown.length = x, x.shape[2]
        return grown

    @property
    def data(self) -> torch.Tensor | None:
        """The filled part, `[B, H, length, ...]` (a view), or None before the first append."""
        return None if self._data is None else self._data[:, :, : self.length]

    @property
    def buffer(self) -> torch.Tensor | None:
        """All of the storage, spare capacity included (a view whose address never changes
        until the tensor grows past its capacity)."""
        return self._data

    @property
    def capacity(self) -> int:
        return 0 if self._data is None else self._data.shape[2]

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[2]
        if self._data is None:
            self._data = x.new_empty((*x.shape[:2], max(n, 16), *x.shape[3:]))
        elif self.length + n > self._data.shape[2]:
            self.reserve(max(self.length + n, 2 * self._data.shape[2]))
        self._data[:, :, self.length : self.length + n] = x
        self.length += n

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` entries without moving again (needs a first append)."""
        if self._data is None:
            raise RuntimeError("reserve needs the tensor's first entries (for shape and dtype)")
        if capacity <= self._data.shape[2]:
            return
        grown = self._data.new_empty((*self._data.shape[:2], capacity, *self._data.shape[3:]))
        grown[:, :, : self.length] = self._data[:, :, : self.length]
        self._data = grown

    def pop_front(self, n: int) -> torch.Tensor:
        """Remove and return the first n entries; the rest move to the front, in place."""
        popped = self._data[:, :, :n].clone()
        rest = self._data[:, :, n : self.length].clone()
        self._data[:, :, : self.length - n] = rest
        self.length -= n
        return popped

    def nbytes(self) -> int:
        return 0 if self._data is None else self._data.numel() * self._data.element_size()


class UnitStore:
    """Keys, values and representatives of every packed unit of one layer.

    keys, values: [B, Hkv, n_units * unit_size, D]; reps: [B, Hkv, n_units, R, D].
    """

    def __init__(self, unit_size: int) -> None:
        self.unit_size = unit_size
        self.start = 0  # stream index of the first unit's first token
        self.keys = GrowingTensor()
        self.values = GrowingTensor()
        self.reps = GrowingTensor()

    @property
    def n_units(self) -> int:
        return self.reps.length

    def add(self, keys: torch.Tensor, values: torch.Tensor, reps: torch.Tensor) -> None:
        """Append whole units: keys/values [B, H, n * unit_size, D], reps [B, H, n, R, D]."""
        self.keys.append(keys)
        self.values.append(values)
        self.reps.append(reps)

    def token_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Stream index of every token of the units `ids` [..., k] -> [..., k * unit_size]."""
        offsets = torch.arange(self.unit_size, device=ids.device)
        return (self.start + ids.unsqueeze(-1) * self.unit_size + offsets).flatten(-2)

    def span(self, unit: int) -> tuple[int, int]:
        """[start, end) stream indices of one unit."""
        first = self.start + unit * self.unit_size
        return first, first + self.unit_size

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes() + self.reps.nbytes()
