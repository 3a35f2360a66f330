"""KV tiers: unit keys and values in host memory, the recently retrieved ones cached on the device.

With `MemoryConfig(device_units=P)` a layer's unit pool lives in host memory (pinned on CUDA) and a
`UnitCache` of P units per batch row and KV head sits in front of it on the device. A step first
`fetch`es the units it retrieved: every miss is copied from the host once (the least recently used
slot makes way), then the step attends over the cache through the returned slots, as it would
over the whole pool through the unit ids. Representatives stay on the device: they are what every
step scores.

Every operation of a fetch runs on the device and reads nothing back, so a captured decode step
(`agentmem.hf.graphs`) keeps its graph: one kernel updates the tables (`fetch_units`), another
reads the missing units from the pinned host pool in place through UVA (`copy_units`), so only
the misses cross PCIe. A captured prefill chunk writes the units it packs into the host pool with
the same copy kernel.
"""

from __future__ import annotations

import torch

from agentmem_kernels import copy_units, fetch_units


class UnitCache:
    """P device slots per (batch row, KV head) holding units of a host pool, least recently used
    out first.

    Tables (`agentmem_kernels.fetch_units`), each with one scratch column at its end that masked
    writes go to (no branch, no read-back): `slot_of` [B, H, C + 1] the slot of unit u or -1,
    `unit_of` [B, H, P + 1] the unit in slot s or -1, `last_used` [B, H, P + 1] the fetch that
    last used slot s (its scratch column counts the row's fetches).
    """

    def __init__(self, n_slots: int, unit_size: int) -> None:
        self.n_slots, self.unit_size = n_slots, unit_size
        self.keys: torch.Tensor | None = None  # [B, H, P * unit_size, D]
        self.values: torch.Tensor | None = None
        self.slot_of: torch.Tensor | None = None
        self.unit_of: torch.Tensor | None = None
        self.last_used: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None  # [hits, lookups] int64

    @property
    def units_covered(self) -> int:
        """Unit ids the tables can take without growing."""
        return 0 if self.slot_of is None else self.slot_of.shape[2] - 1

    def reserve(self, pool_k: torch.Tensor, n_units: int, device: torch.device) -> None:
        """Allocate the cache for a pool like `pool_k` [B, H, N, D] and grow `slot_of` to cover
        `n_units` unit ids (before a captured step: nothing moves afterwards)."""
        batch, heads, _, head_dim = pool_k.shape
        slots = self.n_slots
        if self.keys is None:
            shape = (batch, heads, slots * self.unit_size, head_dim)
            self.keys = torch.zeros(shape, dtype=pool_k.dtype, device=device)
            self.values = torch.zeros_like(self.keys)
            self.unit_of = torch.full((batch, heads, slots + 1), -1, device=device)
            self.last_used = torch.full_like(self.unit_of, -1)
            self.counters = torch.zeros(2, dtype=torch.long, device=device)
        if n_units > self.units_covered:
            covered = max(n_units, 2 * self.units_covered, 64)
            grown = torch.full((batch, heads, covered + 1), -1, device=device)
            if self.slot_of is not None:
                grown[:, :, : self.units_covered] = self.slot_of[:, :, :-1]
            self.slot_of = grown

    def fetch(self, ids: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor) -> torch.Tensor:
        """Slots [B, H, k] holding the units `ids` [B, H, k] (distinct per row) after copying the
        missing ones from the pool (`pool_k`, `pool_v` [B, H, N * unit_size, D], host memory).
        The tables must cover every id (`reserve`)."""
        slots, copy_to = fetch_units(ids, self.slot_of, self.unit_of, self.last_used, self.counters)
        copy_units(pool_k, pool_v, ids, self.keys, self.values, copy_to, self.unit_size)
        return slots

    def hit_rate(self) -> float | None:
        """Share of the fetched units that were on the device already (None before a fetch;
        reads the counters back)."""
        if self.counters is None or not int(self.counters[1]):
            return None
        return int(self.counters[0]) / int(self.counters[1])

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.slot_of, self.unit_of, self.last_used)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
