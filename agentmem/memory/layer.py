"""Per-layer state: unbounded memory of a global layer, bounded cache of a sliding layer.

`MemoryLayer` keeps sinks, packed units and the local window of one global-attention layer and
answers one step at a time: make room (pack the oldest local tokens into units), retrieve the top-k
units for the step's queries, attend over `[sinks | units | local]`. A step's cost is bounded by the
window, plus scoring the representatives. Keys are stored pre-RoPE; positions are given per step.
"""

from __future__ import annotations

import torch

from agentmem.config import MemoryConfig
from agentmem.memory.policy import Rope, Window, attend
from agentmem.memory.representatives import representatives, score_kind
from agentmem.memory.store import UnitStore
from agentmem_kernels import attention, gather_units, rope, score_units


class _PendingKV:
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

    def take(self, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.k.shape[2] != n_queries:
            raise RuntimeError(
                "agentmem: attention called without the matching cache update "
                "(the model must be wrapped with agentmem.wrap and given an AgentMemCache)"
            )
        k, v = self.k, self.v
        self.k = self.v = None
        return k, v


class MemoryLayer:
    """Unbounded KV memory of one global-attention layer with a finite attention window."""

    def __init__(self, config: MemoryConfig, rotary: Rope) -> None:
        self.config = config
        self.rotary = rotary
        self.seen = 0  # tokens of the stream this layer has attended
        self.sink_k: torch.Tensor | None = None  # [B, Hkv, S, D]
        self.sink_v: torch.Tensor | None = None
        self.units = UnitStore(config.unit_size)
        self.local_k: torch.Tensor | None = None  # [B, Hkv, L, D]
        self.local_v: torch.Tensor | None = None
        self.local_mass: torch.Tensor | None = None  # [B, Hkv, L] fp32
        self.dropped = 0  # tokens discarded (streaming)
        self.last_ids: torch.Tensor | None = None  # [B, Hkv, k] units retrieved by the last step
        self.pending = _PendingKV()

    @property
    def n_sinks(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def n_local(self) -> int:
        return 0 if self.local_k is None else self.local_k.shape[2]

    @property
    def local_start(self) -> int:
        """Stream index of the first local token."""
        return self.seen - self.n_local

    def _append_local(self, k: torch.Tensor, v: torch.Tensor) -> None:
        mass = torch.zeros(k.shape[:3], device=k.device)
        if self.local_k is None:
            self.local_k, self.local_v, self.local_mass = k, v, mass
        else:
            self.local_k = torch.cat((self.local_k, k), dim=2)
            self.local_v = torch.cat((self.local_v, v), dim=2)
            self.local_mass = torch.cat((self.local_mass, mass), dim=2)
        self.seen += k.shape[2]

    def _pop_local(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove and return the oldest n local tokens (keys, values, mass)."""
        popped = self.local_k[:, :, :n], self.local_v[:, :, :n], self.local_mass[:, :, :n]
        self.local_k = self.local_k[:, :, n:]
        self.local_v = self.local_v[:, :, n:]
        self.local_mass = self.local_mass[:, :, n:]
        return popped

    def _make_room(self, incoming: int) -> None:
        """Move the oldest local tokens to sinks, units (or nowhere, streaming) so that the
        local window holds at most n_local tokens once `incoming` more arrive."""
        cfg = self.config
        if cfg.position == "full":
            return
        excess = self.n_local + incoming - cfg.n_local
        sink_room = cfg.n_init - self.n_sinks
        if excess > 0 and sink_room > 0:
            k, v, _ = self._pop_local(min(excess, sink_room, self.n_local))
            self.sink_k = k if self.sink_k is None else torch.cat((self.sink_k, k), dim=2)
            self.sink_v = v if self.sink_v is None else torch.cat((self.sink_v, v), dim=2)
            excess -= k.shape[2]
            self.units.start = self.n_sinks
        if excess <= 0:
            return
        n_units = -(-excess // cfg.unit_size)
        n_tokens = n_units * cfg.unit_size
        if n_tokens > self.n_local:
            raise RuntimeError(
                f"agentmem: {incoming} tokens in one step do not fit the local window; "
                f"steps are limited to exec_chunk={cfg.exec_chunk} tokens"
            )
        k, v, mass = self._pop_local(n_tokens)
        if not cfg.retrieves:
            self.dropped += n_tokens
            return
        unit_shape = (*k.shape[:2], n_units, cfg.unit_size)
        reps = representatives(
            k.view(*unit_shape, -1), mass.view(unit_shape), kind=cfg.repr, r=cfg.repr_topk
        )
        self.units.add(k, v, reps)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hand over a step's new pre-RoPE keys/values [B, Hkv, T, D] (from the cache's update)."""
        self.pending.put(k, v)

    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output [B, Hq, T, D] (dtype of q) for the queries of the stored step.

        Long steps are cut into exec_chunk pieces, each packed, retrieved and attended in turn.
        """
        k_new, v_new = self.pending.take(q.shape[2])
        limit = self.config.exec_chunk if self.config.position != "full" else q.shape[2]
        outs = []
        for first in range(0, q.shape[2], limit):
            piece = slice(first, first + limit)
            outs.append(self._step(q[:, :, piece], k_new[:, :, piece], v_new[:, :, piece], scale))
        return torch.cat(outs, dim=2).to(q.dtype)

    def _step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        cfg = self.config
        self._make_room(k.shape[2])
        self._append_local(k, v)
        window = self._window(q, scale)
        want_mass = cfg.retrieves and cfg.repr == "attention"
        out, mass = attend(
            q, window, config=cfg, rotary=self.rotary, scale=scale, want_mass=want_mass
        )
        if mass is not None:
            self.local_mass += mass
        return out

    def _window(self, q: torch.Tensor, scale: float) -> Window:
        """[sinks | retrieved units | local] for the step's queries."""
        device = self.local_k.device
        n_queries = q.shape[2]
        parts_k, parts_v, parts_abs = [], [], []
        if self.n_sinks:
            parts_k.append(self.sink_k)
            parts_v.append(self.sink_v)
            parts_abs.append(torch.arange(self.n_sinks, device=device))
        self.last_ids = None
        if self.config.retrieves and self.units.n_units:
            ids = self._retrieve(q, scale)
            self.last_ids = ids
            unit_size = self.config.unit_size
            parts_k.append(gather_units(self.units.keys.data, ids, unit_size))
            parts_v.append(gather_units(self.units.values.data, ids, unit_size))
            parts_abs.append(self.units.token_index(ids))
        n_memory = sum(part.shape[2] for part in parts_k)
        parts_k.append(self.local_k)
        parts_v.append(self.local_v)
        parts_abs.append(torch.arange(self.local_start, self.seen, device=device))
        if any(part.dim() == 3 for part in parts_abs):
            shape = self.local_k.shape[:2]
            parts_abs = [p if p.dim() == 3 else p.expand(*shape, -1) for p in parts_abs]
        return Window(
            k=torch.cat(parts_k, dim=2),
            v=torch.cat(parts_v, dim=2),
            k_abs=torch.cat(parts_abs, dim=-1),
            n_memory=n_memory,
            q_abs=torch.arange(self.seen - n_queries, self.seen, device=device),
            unit_start=self.units.start,
        )

    def _retrieve(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Ids [B, Hkv, k] of the units whose representatives best match the step's queries."""
        cfg = self.config
        n_units = self.units.n_units
        if n_units <= cfg.topk:
            ids = torch.arange(n_units, device=q.device)
            return ids.expand(*self.local_k.shape[:2], -1)
        # Score as if each unit sat just beyond the local window, where it will be attended.
        distance = min(cfg.n_local, self.rotary.max_positions - 1)
        cos, sin = self.rotary.cos_sin(
            torch.tensor(distance, device=q.device), q.dtype, distance + 1
        )
        return score_units(
            rope(q, cos, sin),
            self.units.reps.data,
            kind=score_kind(cfg.repr),
            scale=scale,
            k=cfg.topk,
        )

    def attended_spans(self) -> list[tuple[int, int]]:
        """Stream spans [start, end) the last step attended in this layer (batch 0, any head)."""
        spans = []
        if self.n_sinks:
            spans.append((0, self.n_sinks))
        if self.last_ids is not None:
            ids = sorted(set(self.last_ids[0].flatten().tolist()))
            spans.extend(self.units.span(i) for i in ids)
        spans.append((self.local_start, self.seen))
        return spans

    def nbytes(self) -> int:
        tensors = (self.sink_k, self.sink_v, self.local_k, self.local_v)
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + self.units.nbytes()


class SlidingLayer:
    """The bounded cache of a sliding-window layer: its last `window - 1` tokens, pre-RoPE."""

    def __init__(self, window: int, rotary: Rope) -> None:
        self.window = window
        self.rotary = rotary
        self.seen = 0
        self.k: torch.Tensor | None = None  # [B, Hkv, <= window - 1 + T, D]
        self.v: torch.Tensor | None = None
        self.pending = _PendingKV()

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pending.put(k, v)

    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Sliding-window attention of the stored step's queries: [B, Hq, T, D] in q's dtype."""
        k_new, v_new = self.pending.take(q.shape[2])
        if self.k is None:
            self.k, self.v = k_new, v_new
        else:
            keep = self.window - 1
            self.k = torch.cat((self.k[:, :, -keep:], k_new), dim=2)
            self.v = torch.cat((self.v[:, :, -keep:], v_new), dim=2)
        self.seen += q.shape[2]
        n_keys, n_queries = self.k.shape[2], q.shape[2]
        # Keys renumbered from 0: RoPE only sees distances.
        positions = torch.arange(n_keys, device=q.device)
        cos, sin = self.rotary.cos_sin(positions, q.dtype, n_keys)
        keys = rope(self.k, cos, sin)
        queries = rope(q, cos[n_keys - n_queries :], sin[n_keys - n_queries :])
        # Query blocks see overlapping key ranges; blocking skips most of what the window masks.
        block = max(self.window // 4, 64)
        outs = []
        for first in range(0, n_queries, block):
            last = min(first + block, n_queries)
            q_first = n_keys - n_queries + first  # key index of the block's first query
            k_first = max(q_first - self.window + 1, 0)
            k_stop = n_keys - n_queries + last
            out, _, _ = attention(
                queries[:, :, first:last],
                keys[:, :, k_first:k_stop],
                self.v[:, :, k_first:k_stop],
                scale=scale,
                q_abs=positions[q_first:k_stop],
                k_abs=positions[k_first:k_stop],
                max_dist=self.window,
                return_lse=False,
            )
            outs.append(out)
        return torch.cat(outs, dim=2).to(q.dtype)

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()
