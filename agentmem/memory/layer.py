"""Per-layer state of a global-attention layer: unbounded memory, finite window.

`MemoryLayer` keeps sinks, packed units and the local window of one global-attention layer and
answers one step at a time: make room (pack the oldest local tokens into units), retrieve the top-k
units for the step's queries, attend over `[sinks | units | local]`. A step's cost is bounded by the
window, plus scoring the representatives. Keys are stored pre-RoPE; positions are given per step.
"""

from __future__ import annotations

import torch

from agentmem.config import MemoryConfig
from agentmem.memory.index import UnitIndex, indexed_top_units
from agentmem.memory.pending import PendingKV, shift_in
from agentmem.memory.policy import Rope, Window, attend
from agentmem.memory.representatives import representatives, score_kind
from agentmem.memory.store import GrowingTensor, LazyRows, UnitStore
from agentmem_kernels import (
    append_token,
    copy_units,
    gather_units,
    memory_attention,
    rope,
    score_units,
)


class MemoryLayer:
    """Unbounded KV memory of one global-attention layer with a finite attention window.

    Storage: sinks (the first `n_init` tokens), a pool of packed units, and the local window in a
    buffer that packing empties from the front. With `infllm` and `stacked` positions a step reads
    all three in place (`memory_attention`); the other policies assemble the window first.

    `start_static` switches steps of a fixed number of tokens (one when decoding, a prefill chunk
    in a steady state) to a form a CUDA graph can capture: the local length and the number of units
    live in a device tensor that the host never reads back; the caller calls `before_static_step`
    and `after_static_step` around each replay (`agentmem.hf.graphs`).
    """

    def __init__(self, config: MemoryConfig, rotary: Rope) -> None:
        self.config = config
        self.rotary = rotary
        self.seen = 0  # tokens of the stream this layer has attended
        self.sink_k: torch.Tensor | None = None  # [B, Hkv, S, D]
        self.sink_v: torch.Tensor | None = None
        self.units = UnitStore(config.unit_size, config.device_units)
        self.local = (GrowingTensor(), GrowingTensor(), GrowingTensor())  # keys, values, mass
        # infllm/stacked: the local keys also kept rotated to their place in the window (key j at
        # position j), so that the kernel reads them as they are; redone when packing shifts them.
        self.local_rotated = GrowingTensor()
        self.dropped = 0  # tokens discarded (streaming)
        # [B, Hkv, k] units retrieved by the last step: by rank (the largest mass first) where
        # `last_ranked`, else ascending
        self.last_ids: torch.Tensor | None = None
        self.last_ranked = False
        # Whether the next one-token step may attend `last_ids` again (`retrieve_every`): they
        # were chosen by a one-token step, with no longer step since.
        self.reusable_ids = False
        # [B, Hq, query_window, D]: the latest queries, rotated to the scoring distance (zeros
        # before any: a zero query adds the same mass to every unit, so it changes no choice).
        self.recent_q: torch.Tensor | None = None
        self.pending = PendingKV()
        self.index = UnitIndex()  # index="faiss": graphs over the representatives, built on use
        # Static mode: [local length, units, ring slot] int32 on the device. A captured decoding
        # step writes its scoring query into recent_q as a ring, at slot `ring` (the oldest).
        self.counts: torch.Tensor | None = None
        self.ring = 0
        self.static_query: torch.Tensor | None = None  # the ring of one, query_window=1
        self.static_tokens = 1  # tokens per static step
        self.static_armed = False  # set by agentmem.hf.graphs around the static steps it runs
        # retrieve_every > 1: the last retrieval's ids in a buffer both captured decoding steps
        # read, and whether the step being run (or captured) attends them rather than retrieving
        self.static_ids: torch.Tensor | None = None
        self.static_reuse = False

    def empty(self) -> MemoryLayer:
        """A new, empty memory of this layer's layout."""
        return MemoryLayer(self.config, self.rotary)

    # -- state: the one way in and out ------------------------------------------------------

    def state_dict(self, units_from: int = 0) -> dict:
        """What this memory holds: {"meta": small JSON-able facts, "tensors": name -> tensor}.

        Tensors are views, not copies (but the latest queries between captured decoding steps,
        put in order). `units_from` leaves out the first units (a save that already wrote
        them); every other part is whole. Not while a captured step runs.
        """
        if self.static_armed:
            raise RuntimeError("a memory in the middle of a captured step has no state to give")
        units = self.units
        if not 0 <= units_from <= units.n_units:
            raise ValueError(f"units_from={units_from} outside [0, {units.n_units}]")
        units.materialize(units_from)
        rows = slice(units_from * self.config.unit_size, units.n_units * self.config.unit_size)
        parts = {
            "sink_k": self.sink_k,
            "sink_v": self.sink_v,
            "unit_k": None if units.keys.data is None else units.keys.data[:, :, rows],
            "unit_v": None if units.values.data is None else units.values.data[:, :, rows],
            "reps": None if units.reps.data is None else units.reps.data[:, :, units_from:],
            "local_k": self.local_k,
            "local_v": self.local_v,
            "local_mass": self.local_mass,
            "last_ids": self.last_ids,
            "recent_q": self._recent_queries(),
        }
        meta = {
            "kind": "memory",
            "memory": self.config.model_dump(),
            "seen": self.seen,
            "units_start": units.start,
            "n_units": units.n_units,
            "units_from": units_from,
            "dropped": self.dropped,
            "last_ranked": self.last_ranked,
        }
        return {"meta": meta, "tensors": {k: v for k, v in parts.items() if v is not None}}

    def load_state_dict(self, state: dict) -> None:
        """Hold exactly what `state_dict()` (with every unit) gave; tensors are taken, not copied.
        Unit keys and values may be `LazyRows`, read when a step first retrieves their units.

        The memory layout must be this layer's: a state from another layout is refused."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("kind") != "memory":
            raise ValueError(f"not a memory layer's state (kind {meta.get('kind')!r})")
        if not self.config.same_layout(MemoryConfig(**meta["memory"])):  # new fields: defaults
            raise ValueError(
                f"this state was made with the memory layout {meta['memory']}, which is not this "
                f"layer's {self.config.model_dump()}; load it with the layout it was made with"
            )
        if meta["units_from"] != 0:
            raise ValueError("a state without its first units cannot be loaded; join the saves")
        n_units = meta["n_units"]
        reps = tensors.get("reps")
        if (0 if reps is None else reps.shape[2]) != n_units:
            raise ValueError(f"the state names {n_units} units but holds representatives of "
                             f"{0 if reps is None else reps.shape[2]}")  # fmt: skip
        self.stop_static()
        self.seen, self.dropped = meta["seen"], meta["dropped"]
        self.sink_k, self.sink_v = tensors.get("sink_k"), tensors.get("sink_v")
        self.units = UnitStore(self.config.unit_size, self.config.device_units)
        self.units.start = meta["units_start"]
        unit_k, unit_v = tensors.get("unit_k"), tensors.get("unit_v")
        local_k = tensors.get("local_k")
        held = (t.device for t in (reps, local_k, self.sink_k) if t is not None)
        device = next(held, torch.device("cpu"))
        if isinstance(unit_k, LazyRows):  # a lazy resume: read as steps retrieve them
            self.units.hold_lazy(unit_k, unit_v, reps, device)
        else:
            self.units.hold(unit_k, unit_v, reps, device)
        self.local = tuple(
            GrowingTensor.holding(tensors.get(name))
            for name in ("local_k", "local_v", "local_mass")
        )
        self.local_rotated = GrowingTensor()
        if self.reads_in_place and local_k is not None:
            cos, sin = self._table(local_k.shape[2], local_k.device)
            self.local_rotated.append(rope(local_k.float(), cos, sin).to(local_k.dtype))
        self.last_ids = tensors.get("last_ids")
        self.last_ranked = meta.get("last_ranked", False)  # older states do not say
        self.reusable_ids = False
        self.recent_q = tensors.get("recent_q")
        self.index = UnitIndex()
        self.pending.clear()

    @property
    def local_k(self) -> torch.Tensor | None:
        """The local window's keys [B, Hkv, L, D], oldest first."""
        return self.local[0].data

    @property
    def local_v(self) -> torch.Tensor | None:
        return self.local[1].data

    @property
    def local_mass(self) -> torch.Tensor | None:
        """[B, Hkv, L] fp32: attention each local key received so far."""
        return self.local[2].data

    @property
    def n_sinks(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def n_local(self) -> int:
        return self.local[0].length

    @property
    def local_start(self) -> int:
        """Stream index of the first local token."""
        return self.seen - self.n_local

    @property
    def reads_in_place(self) -> bool:
        """Whether steps read sinks, units and local window in place (infllm, stacked)."""
        return self.config.position in ("infllm", "stacked")

    def _append_local(self, k: torch.Tensor, v: torch.Tensor) -> None:
        first = self.n_local
        self.local[0].append(k)
        self.local[1].append(v)
        self.local[2].append(torch.zeros(k.shape[:3], device=k.device))
        self.seen += k.shape[2]
        if self.reads_in_place:
            cos, sin = self._table(self.n_local, k.device)
            self.local_rotated.append(rope(k.float(), cos[first:], sin[first:]).to(k.dtype))

    def _pop_local(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove and return the oldest n local tokens (keys, values, mass)."""
        popped = tuple(part.pop_front(n) for part in self.local)
        if self.reads_in_place:  # every remaining key moved n places down
            cos, sin = self._table(self.n_local, popped[0].device)
            self.local_rotated.length = 0
            self.local_rotated.append(rope(self.local_k.float(), cos, sin).to(self.local_k.dtype))
        return popped

    def _table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [n, D] of positions 0..n-1 (a view of the cached table)."""
        cos, sin = self.rotary.table(n, torch.float32, device)
        return cos[:n], sin[:n]

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
        if self.counts is not None:
            if self.static_armed:
                return self._static_step(q, k_new, v_new, scale).to(q.dtype)
            # An ordinary step between static ones (another caller on this memory): the host's
            # records are the truth; static mode ends, its owner starts it again when it resumes.
            self.stop_static()
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
        scoring = self._scoring_queries(q) if cfg.retrieves else None
        if not self.reuses_ids(q.shape[2]):
            self.last_ids, self.last_ranked = None, False
            if cfg.retrieves and self.units.n_units:
                self.last_ids = self._retrieve(scoring, scale)
        self.reusable_ids = q.shape[2] == 1 and self.last_ids is not None
        if self.last_ids is not None:
            self.units.fault_in(self.last_ids)  # a lazily resumed memory reads them now
        if self.reads_in_place:
            return self._attend_in_place(q, scale, self.last_ids, self.n_local)
        window = self._window(q, self.last_ids)
        want_mass = cfg.retrieves and cfg.repr == "attention"
        out, mass = attend(
            q, window, config=cfg, rotary=self.rotary, scale=scale, want_mass=want_mass
        )
        if mass is not None:
            self.local_mass.add_(mass)
        return out

    def reuses_ids(self, tokens: int, seen: int | None = None) -> bool:
        """Whether a step of `tokens` tokens that brings the stream to `seen` tokens (this
        layer's count by default: a step whose tokens are appended) attends the last step's
        units rather than retrieving: one-token steps between every `retrieve_every`-th token
        of the stream, after a one-token step that chose units."""
        seen = self.seen if seen is None else seen
        every = self.config.retrieve_every
        return tokens == 1 and every > 1 and self.reusable_ids and seen % every != 0

    def _attend_in_place(
        self, q: torch.Tensor, scale: float, ids: torch.Tensor | None, n_local: int | torch.Tensor
    ) -> torch.Tensor:
        """[sinks | units `ids` | first `n_local` keys of the local buffer], positions as the
        policy says; adds the attention local keys received to their mass."""
        cfg = self.config
        pool_k, pool_v = self.units.keys.buffer, self.units.values.buffer
        if ids is not None:  # tiered: the units fetched to the device cache, read from there
            pool_k, pool_v, ids = self.units.pool_for(ids)
        span = 1 if cfg.position == "infllm" else max(cfg.unit_size, cfg.n_init)
        cos, sin = self.rotary.table(
            max(cfg.n_local + span, self.local[0].capacity), torch.float32, q.device
        )
        out, _, mass = memory_attention(
            q, sink_k=self.sink_k, sink_v=self.sink_v,
            pool_k=pool_k, pool_v=pool_v, ids=ids,
            unit_size=cfg.unit_size, local_k=self.local_rotated.buffer,
            local_v=self.local[1].buffer, n_local=n_local, cos=cos, sin=sin, scale=scale,
            memory_q_pos=cfg.n_local + span - 1, stacked=cfg.position == "stacked",
            local_rotated=True, with_local_mass=cfg.retrieves and cfg.repr == "attention",
            out_dtype=q.dtype,
        )  # fmt: skip
        if mass is not None:
            local_mass = self.local[2].buffer
            if isinstance(n_local, int):  # the filled part only
                local_mass, mass = local_mass[:, :, :n_local], mass[:, :, :n_local]
            local_mass += mass
        return out

    def _window(self, q: torch.Tensor, ids: torch.Tensor | None) -> Window:
        """[sinks | retrieved units | local] for the step's queries, assembled."""
        device = self.local_k.device
        n_queries = q.shape[2]
        parts_k, parts_v, parts_abs = [], [], []
        if self.n_sinks:
            parts_k.append(self.sink_k)
            parts_v.append(self.sink_v)
            parts_abs.append(torch.arange(self.n_sinks, device=device))
        if ids is not None:
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

    def _scoring_queries(self, q: torch.Tensor) -> torch.Tensor:
        """The queries that choose this step's units, rotated to the scoring distance: the
        step's own, preceded (a step of fewer than `query_window` tokens) by the latest ones
        before it, so that a decoded token chooses with the question it answers. The latest
        `query_window` are kept for the next step (in place: a captured step's buffer)."""
        distance = self._scoring_distance
        cos, sin = self._table(distance + 1, q.device)
        q = rope(q.float(), cos[distance], sin[distance]).to(q.dtype)
        size = self.config.query_window
        if size == 1:
            return q
        if self.recent_q is None:
            self.recent_q = q.new_zeros(*q.shape[:2], size, q.shape[3])
        if q.shape[2] >= size:  # a prefill chunk: its own last queries, nothing joined
            latest = q[:, :, -size:]
        else:
            latest = torch.cat((self.recent_q, q), dim=2)[:, :, -size:]
        if self.counts is not None:  # captured: the buffer stays where the graph reads it
            self.recent_q.copy_(latest)
        else:  # a new tensor: a state handed out before keeps what it held
            self.recent_q = latest.clone()
        return q if q.shape[2] >= size else latest

    @property
    def _scoring_distance(self) -> int:
        """Where units are scored from: as if each sat just beyond the local window, where it
        will be attended."""
        return min(self.config.n_local, self.rotary.max_positions - 1)

    def _recent_queries(self) -> torch.Tensor | None:
        """The latest scoring queries, oldest first (between captured decoding steps, a ring)."""
        if self.recent_q is None or not self.ring:
            return self.recent_q
        return self.recent_q.roll(-self.ring, dims=2)

    def _retrieve(
        self, q: torch.Tensor, scale: float, n_units: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ids [B, Hkv, k] of the units whose representatives best match `q`, the step's scoring
        queries (`_scoring_queries`).

        `n_units` (static mode): the device count of units; the pool's spare capacity is scored
        too, masked, so that shapes do not change from step to step.
        """
        cfg = self.config
        self.last_ranked = False
        if n_units is None and self.units.n_units <= cfg.topk:  # every unit: no choice made
            ids = torch.arange(self.units.n_units, device=q.device)
            return ids.expand(*self.local_k.shape[:2], -1)
        if cfg.index == "faiss" and n_units is None and self.units.n_units >= cfg.index_min_units:
            return indexed_top_units(
                self.index, q, self.units.reps.data, k=cfg.topk, kind=score_kind(cfg.repr),
                scale=scale,
            )  # fmt: skip
        reps = self.units.reps.data if n_units is None else self.units.reps.buffer
        # Read in place, the units may come in any order: by rank; an assembled window keeps the
        # stream's.
        self.last_ranked = self.reads_in_place
        return score_units(
            q, reps, kind=score_kind(cfg.repr), scale=scale, k=cfg.topk, n_valid=n_units,
            ascending=not self.reads_in_place,
        )  # fmt: skip

    # -- static steps (CUDA graphs) ----------------------------------------------------------
    #
    # One-token steps (decode): the local window grows by one a step; the host packs a unit
    # between replays when it is full. Steps of T > 1 tokens (prefill chunks, T a multiple of
    # unit_size) in a steady state: the window holds more than n_local - unit_size tokens, so
    # every step packs exactly T tokens into units itself and every shape stays fixed.

    def static_problem(self, tokens: int = 1) -> str | None:
        """Why steps of `tokens` tokens of this layer cannot be captured now, or None."""
        cfg = self.config
        if not self.reads_in_place or not cfg.retrieves:
            return f"static steps need position 'infllm' or 'stacked', not '{cfg.position}'"
        if cfg.index != "exact":
            return "static steps score on the device; index='faiss' searches on the host"
        if self.n_sinks < cfg.n_init or self.units.n_units < cfg.topk:
            return (
                f"static steps start once the memory holds {cfg.n_init} sinks and at least "
                f"topk={cfg.topk} units; this layer has {self.n_sinks} and {self.units.n_units}"
            )
        if tokens > 1 and (tokens % cfg.unit_size or tokens > cfg.exec_chunk):
            return f"static steps of {tokens} tokens need a multiple of unit_size up to exec_chunk"
        if tokens > 1 and not cfg.n_local - cfg.unit_size < self.n_local <= cfg.n_local:
            # Then every step packs exactly its own number of tokens: the window keeps its size.
            return "static steps of several tokens start from a steady local window"
        return None

    def start_static(self, unit_capacity: int, tokens: int = 1) -> None:
        """Make steps of `tokens` tokens capturable: fixed buffers (local window,
        `unit_capacity` units), counts on the device. Needs `static_problem(tokens)` None."""
        cfg = self.config
        if (problem := self.static_problem(tokens)) is not None:
            raise ValueError(problem)
        self.stop_static()  # the queries oldest first again, if a capture is being renewed
        self.units.materialize()  # a captured step retrieves on the device: every unit read
        for part in (*self.local, self.local_rotated):
            part.reserve(cfg.n_local)
        self.units.reserve(unit_capacity, self.local_k.device)
        if self.recent_q is not None:  # captured steps write it in place: this layer's own
            self.recent_q = self.recent_q.clone()
        self.counts = torch.zeros(3, dtype=torch.int32, device=self.local_k.device)
        self.static_query = None  # made by the first step, in its shape
        self.static_tokens = tokens
        self.static_ids = None
        if tokens == 1 and cfg.retrieve_every > 1:
            shape = (*self.local_k.shape[:2], cfg.topk)
            reusable = self.reusable_ids and tuple(self.last_ids.shape) == shape
            self.reusable_ids = reusable
            self.static_ids = (
                self.last_ids.clone()
                if reusable
                else torch.zeros(shape, dtype=torch.long, device=self.local_k.device)
            )
        self._sync_counts()

    def stop_static(self) -> None:
        self.recent_q = self._recent_queries()
        self.ring = 0
        self.counts = None

    @property
    def static_room(self) -> int:
        """Units the pool can still take without moving (static mode)."""
        units = self.units
        pool = min(units.keys.capacity, units.values.capacity) // self.config.unit_size
        return min(units.reps.capacity, pool) - units.n_units

    def static_units_per_step(self) -> int:
        """Units a static step may add: one (decode, packed by the host) or T / unit_size."""
        return max(1, self.static_tokens // self.config.unit_size)

    def before_static_step(self) -> None:
        """One-token steps: pack the oldest local tokens if the next token would not fit (every
        unit_size steps), outside the graph; counts follow by device-side fills, no read-back."""
        if self.static_tokens > 1 or self.n_local + 1 <= self.config.n_local:
            return
        if self.static_room < 1:
            raise RuntimeError("agentmem: the static unit pool is full; capture again, larger")
        self._make_room(1)
        self._sync_counts()

    def after_static_step(self) -> None:
        """The host's record of what a replayed step did."""
        tokens = self.static_tokens
        if tokens == 1:  # one token more in the local window, one query more in the ring
            for part in (*self.local, self.local_rotated):
                part.length += 1
            self.ring = (self.ring + 1) % self.config.query_window
            self.reusable_ids = True
        else:  # T tokens packed into units, T new ones in the window
            self.reusable_ids = False
            for part in (self.units.keys, self.units.values):
                part.length += tokens
            self.units.reps.length += tokens // self.config.unit_size
        self.seen += tokens

    def _sync_counts(self) -> None:
        self.counts[0].fill_(self.n_local)
        self.counts[1].fill_(self.units.n_units)
        self.counts[2].fill_(self.ring)

    def _static_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Fixed shapes, counts read on the device only."""
        tokens = q.shape[2]
        if tokens != self.static_tokens:
            raise RuntimeError(
                f"agentmem: static steps of {self.static_tokens} tokens got {tokens}"
            )
        if tokens > 1:
            return self._static_chunk(q, k, v, scale)
        size, distance = self.config.query_window, self._scoring_distance
        if size > 1 and self.recent_q is None:  # zeros: no query before this one
            self.recent_q = q.new_zeros(*q.shape[:2], size, q.shape[3])
        if size == 1 and self.static_query is None:
            self.static_query = torch.empty_like(q)
        queries = self.recent_q if size > 1 else self.static_query
        cos, sin = self._table(max(self.local[0].capacity, distance + 1), k.device)
        append_token(
            k, v, q, local_k=self.local[0].buffer, local_v=self.local[1].buffer,
            local_mass=self.local[2].buffer, local_rotated=self.local_rotated.buffer,
            queries=queries, counts=self.counts, cos=cos, sin=sin, query_position=distance,
        )  # fmt: skip
        if self.static_ids is None:
            self.last_ids = self._retrieve(queries, scale, n_units=self.counts[1:2])
        else:  # retrieve_every > 1: one captured step retrieves, the other reads its choice
            if not self.static_reuse:
                self.static_ids.copy_(self._retrieve(queries, scale, n_units=self.counts[1:2]))
            self.last_ids = self.static_ids
        return self._attend_in_place(q, scale, self.last_ids, self.counts[0:1])

    def _static_chunk(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """T tokens into a steady window: the oldest T local tokens become T / unit_size units at
        the pool's device-side end, the rest move down, the new tokens take their place."""
        cfg = self.config
        tokens, window, unit = q.shape[2], self.n_local, cfg.unit_size
        n_units = tokens // unit
        keys, values, mass = (part.buffer[:, :, :tokens] for part in self.local)
        unit_shape = (*keys.shape[:2], n_units, unit)
        reps = representatives(
            keys.reshape(*unit_shape, -1), mass.reshape(unit_shape), kind=cfg.repr,
            r=cfg.repr_topk,
        )  # fmt: skip
        first_unit = self.counts[1:2].long()
        new_units = torch.arange(n_units, device=q.device)
        unit_rows = first_unit + new_units
        if self.units.cache is None:
            rows = first_unit * unit + torch.arange(tokens, device=q.device)
            self.units.keys.buffer.index_copy_(2, rows, keys)
            self.units.values.buffer.index_copy_(2, rows, values)
        else:  # tiered: written into the host pool in place, by the device
            shape = (*keys.shape[:2], n_units)
            copy_units(
                self.local[0].buffer, self.local[1].buffer, new_units.expand(shape),
                self.units.keys.buffer, self.units.values.buffer, unit_rows.expand(shape), unit,
            )  # fmt: skip
        self.units.reps.buffer.index_copy_(2, unit_rows, reps)
        self.counts[1:2].add_(n_units)
        zeros = torch.zeros(k.shape[:3], device=k.device)
        for part, new in zip(self.local, (k, v, zeros), strict=True):
            shift_in(part.buffer[:, :, :window], new)
        cos, sin = self._table(window, k.device)
        local_k = self.local[0].buffer[:, :, :window]
        self.local_rotated.buffer[:, :, :window] = rope(local_k.float(), cos, sin).to(k.dtype)
        self.last_ids = self._retrieve(self._scoring_queries(q), scale, n_units=self.counts[1:2])
        return self._attend_in_place(q, scale, self.last_ids, window)

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
        held = sum(part.nbytes() for part in (*self.local, self.local_rotated))
        sinks = sum(
            t.numel() * t.element_size() for t in (self.sink_k, self.sink_v) if t is not None
        )
        return held + sinks + self.units.nbytes()

    def host_nbytes(self) -> int:
        """Bytes of `nbytes` held in host memory (KV tiers), the rest on the memory's device."""
        return self.units.host_nbytes()
