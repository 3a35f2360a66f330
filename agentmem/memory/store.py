"""Append-only storage of a layer's memory units: their keys, values and representatives.

Units are contiguous in the stream: unit i holds tokens from `start + i * unit_size` on, so spans
are derived, never stored. Buffers grow by doubling, so appending is amortised O(1) and a step's
cost does not grow with what came before. With KV tiers (`device_units`) the keys and values live
in host memory and a `UnitCache` holds the retrieved ones on the device (`agentmem.memory.tiers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from agentmem.memory.tiers import UnitCache


class GrowingTensor:
    """A tensor that grows along dim 2 (`[B, H, n, ...]`), with spare capacity.

    `host`: the storage is in host memory whatever device the entries come from, pinned when they
    come from CUDA (or `pin`), its capacity a power of two (the size the pinned allocator rounds
    every block up to anyway).
    """

    def __init__(self, *, host: bool = False, pin: bool = False) -> None:
        self._data: torch.Tensor | None = None
        self.length = 0
        self.host, self.pin = host, pin

    @classmethod
    def holding(
        cls, x: torch.Tensor | None, *, host: bool = False, pin: bool = False
    ) -> GrowingTensor:
        """A tensor whose entries are `x` [B, H, n, ...]: taken as storage, not copied, unless
        `host` storage is asked for and `x` is elsewhere (or not pinned, `pin`)."""
        grown = cls(host=host, pin=pin)
        if x is None:
            return grown
        if host and (x.device.type != "cpu" or (grown._pins(x) and not x.is_pinned())):
            grown.append(x)
        else:
            grown._data, grown.length = x, x.shape[2]
        return grown

    def _pins(self, x: torch.Tensor) -> bool:
        return self.host and (self.pin or x.is_cuda or x.is_pinned())

    def _new_storage(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        if not self.host:
            return like.new_empty((*like.shape[:2], capacity, *like.shape[3:]))
        capacity = 1 << max(capacity - 1, 1).bit_length()
        shape = (*like.shape[:2], capacity, *like.shape[3:])
        return torch.empty(shape, dtype=like.dtype, device="cpu", pin_memory=self._pins(like))

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
            self._data = self._new_storage(x, max(n, 16))
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
        old = self._data
        grown = self._new_storage(old, capacity)
        grown[:, :, : self.length] = old[:, :, : self.length]
        self._data = grown
        if old.is_pinned():
            # The pinned allocator keeps freed blocks for reuse; a pool that grew never shrinks
            # back, so its old block would only add to what the host holds.
            del old
            release = getattr(torch._C, "_host_emptyCache", None)
            if release is not None:
                release()

    def pop_front(self, n: int) -> torch.Tensor:
        """Remove and return the first n entries; the rest move to the front, in place."""
        popped = self._data[:, :, :n].clone()
        rest = self._data[:, :, n : self.length].clone()
        self._data[:, :, : self.length - n] = rest
        self.length -= n
        return popped

    def nbytes(self) -> int:
        return 0 if self._data is None else self._data.numel() * self._data.element_size()


class LazyRows:
    """A `[B, H, N, ...]` tensor whose rows (dim 2) live elsewhere until read: consecutive
    pieces, each `(rows, read)` with `read(start, end)` giving that piece's rows [start, end).
    A state may hold one in place of unit keys or values (a lazy resume): the memory reads a
    unit's rows when a step first retrieves it."""

    def __init__(
        self, pieces: list[tuple[int, Callable[[int, int], torch.Tensor]]],
        shape: tuple[int, ...], dtype: torch.dtype,
    ) -> None:  # fmt: skip
        if sum(rows for rows, _ in pieces) != shape[2]:
            raise ValueError(f"pieces of {sum(r for r, _ in pieces)} rows for a shape {shape}")
        self.pieces, self.shape, self.dtype = pieces, tuple(shape), dtype

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end), from as many pieces as they span."""
        parts, first = [], 0
        for rows, read in self.pieces:
            lo, hi = max(start, first), min(end, first + rows)
            if lo < hi:
                parts.append(read(lo - first, hi - first))
            first += rows
        return torch.cat(parts, dim=2)

    def to(self, *args, **kwargs) -> LazyRows:
        """Itself: the rows move to the memory's device as they are read."""
        return self


class UnitStore:
    """Keys, values and representatives of every packed unit of one layer.

    keys, values: [B, Hkv, n_units * unit_size, D]; reps: [B, Hkv, n_units, R, D]. With
    `device_units`, keys and values are in host memory and `cache` holds that many units of them
    per (batch row, KV head) on the device (`pool_for`).
    """

    def __init__(self, unit_size: int, device_units: int | None = None) -> None:
        self.unit_size = unit_size
        self.start = 0  # stream index of the first unit's first token
        tiered = device_units is not None
        self.cache = UnitCache(device_units, unit_size) if tiered else None
        self.keys = GrowingTensor(host=tiered)
        self.values = GrowingTensor(host=tiered)
        self.reps = GrowingTensor()

        self._lazy: tuple[LazyRows, LazyRows] | None = None  # keys, values not read yet
        self._resident: torch.Tensor | None = None  # [lazy units] bool: read already

    @property
    def n_units(self) -> int:
        return self.reps.length

    def hold_lazy(
        self, keys: LazyRows, values: LazyRows, reps: torch.Tensor, device: torch.device
    ) -> None:
        """Hold units whose keys and values are read when first asked for (`fault_in`): the
        pool is allocated now (on a CPU its untouched pages cost nothing), filled later."""
        n_units = reps.shape[2]
        if keys.shape[2] != n_units * self.unit_size or values.shape != keys.shape:
            raise ValueError(f"lazy rows of shape {keys.shape} for {n_units} units")
        tiered = self.cache is not None  # then the pool is in host memory, the reps on device
        pin = tiered and torch.device(device).type == "cuda"
        where = "cpu" if tiered else device
        self.keys, self.values = (
            GrowingTensor.holding(
                torch.empty(rows.shape, dtype=rows.dtype, device=where, pin_memory=pin),
                host=tiered,
            )
            for rows in (keys, values)
        )
        self.reps = GrowingTensor.holding(reps)
        self._lazy = (keys, values)
        self._resident = torch.zeros(n_units, dtype=torch.bool)

    @property
    def lazy_units(self) -> int:
        """Units whose keys and values have not been read yet."""
        return 0 if self._lazy is None else int((~self._resident).sum())

    def fault_in(self, ids: torch.Tensor) -> None:
        """Read the keys and values of the units `ids` (any shape) that are not read yet. While
        units are unread this reads the ids back to the host (a sync on an accelerator)."""
        if self._lazy is None:
            return
        wanted = torch.unique(ids.reshape(-1).cpu())
        wanted = wanted[wanted < len(self._resident)]
        self._read_units(wanted[~self._resident[wanted]].tolist())

    def materialize(self, first: int = 0) -> None:
        """Read every unit from `first` on that is not read yet (before a full state or a
        captured step, which need the whole pool)."""
        if self._lazy is None:
            return
        self._read_units((~self._resident[first:]).nonzero().flatten().add(first).tolist())

    def _read_units(self, units: list[int]) -> None:
        keys, values = self._lazy
        unit = self.unit_size
        for first, last in _runs(units, longest=1024):  # bounded reads
            rows = slice(first * unit, (last + 1) * unit)
            # The pool may have grown inside a step (an inference tensor): write it as one.
            with torch.inference_mode():
                for lazy, pool in ((keys, self.keys), (values, self.values)):
                    read = lazy.read(rows.start, rows.stop)
                    pool.buffer[:, :, rows] = read.to(pool.buffer.device)
            self._resident[first : last + 1] = True
        if bool(self._resident.all()):
            self._lazy = self._resident = None

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

    def hold(
        self, keys: torch.Tensor | None, values: torch.Tensor | None, reps: torch.Tensor | None,
        device: torch.device,
    ) -> None:  # fmt: skip
        """Hold units given whole (a state): taken as they are, or, tiered, copied to (pinned)
        host memory unless there already."""
        tiered = self.cache is not None
        pin = tiered and torch.device(device).type == "cuda"
        self.keys = GrowingTensor.holding(keys, host=tiered, pin=pin)
        self.values = GrowingTensor.holding(values, host=tiered, pin=pin)
        self.reps = GrowingTensor.holding(reps)

    def pool_for(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and indices a step reads the units `ids` [B, H, k] from: the pool and
        `ids` themselves, or, tiered, the device cache and the slots the units were fetched to."""
        if self.cache is None:
            return self.keys.buffer, self.values.buffer, ids
        pool_k, pool_v = self.keys.buffer, self.values.buffer
        self.cache.reserve(pool_k, pool_k.shape[2] // self.unit_size, ids.device)
        slots = self.cache.fetch(ids, pool_k, pool_v)
        return self.cache.keys, self.cache.values, slots

    def reserve(self, n_units: int, device: torch.device) -> None:
        """Room for `n_units` units without moving anything (before a captured step)."""
        for part in (self.keys, self.values):
            part.reserve(n_units * self.unit_size)
        self.reps.reserve(n_units)
        if self.cache is not None:
            self.cache.reserve(self.keys.buffer, self.keys.capacity // self.unit_size, device)

    def nbytes(self) -> int:
        """Bytes held, every tier."""
        cache = 0 if self.cache is None else self.cache.nbytes()
        return self.keys.nbytes() + self.values.nbytes() + self.reps.nbytes() + cache

    def host_nbytes(self) -> int:
        """Bytes held in host memory (the pool's keys and values, tiered)."""
        return 0 if self.cache is None else self.keys.nbytes() + self.values.nbytes()


def _runs(values: list[int], longest: int) -> list[tuple[int, int]]:
    """Sorted distinct ints as runs [(first, last)] of consecutive values, each at most
    `longest` long."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1 and v - runs[-1][0] < longest:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs
