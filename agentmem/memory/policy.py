"""Position policies: where each key of a step's window sits, and the exact attention over it.

A window is `[memory (sinks + retrieved units, in stream order) | local]`. A policy places it as
one or more parts, each with its own key and query positions and a distance mask; all parts are
attended under one softmax (equal to attending each and merging by log-sum-exp). Every position
stays inside the model's trained range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from agentmem.config import MemoryConfig
from agentmem_kernels import placed_attention


class Rope(Protocol):
    """The model's own rotary embedding, evaluated at chosen positions."""

    max_positions: int

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, limit: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape `positions.shape + (D,)`; every position is below `limit`."""
        ...

    def table(
        self, limit: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D] for positions 0..N-1, N >= limit."""
        ...


@dataclass
class Window:
    """The keys one step attends to, pre-RoPE, with their indices in the stream."""

    k: torch.Tensor  # [B, Hkv, K, D]
    v: torch.Tensor  # [B, Hkv, K, D]
    k_abs: torch.Tensor  # [K] or [B, Hkv, K]
    n_memory: int  # keys before the local part
    q_abs: torch.Tensor  # [T]
    unit_start: int = 0  # stream index of the first unit's first token (after the sinks)


@dataclass
class Placement:
    """Keys `[start, stop)` of a window under one position map, and which of them each query
    sees: key j is visible to query t iff `min_dist <= q_abs[t] - k_abs[j] < max_dist`."""

    start: int
    stop: int
    k_pos: torch.Tensor  # [stop - start] or [B, Hkv, stop - start]
    q_pos: torch.Tensor  # [T]
    limit: int  # every position is below it
    min_dist: int = 0
    max_dist: int | None = None


def placements(window: Window, config: MemoryConfig, max_positions: int) -> list[Placement]:
    """How `window` is positioned under `config.position`."""
    n_keys = window.k.shape[2]
    n_queries = window.q_abs.shape[0]
    device = window.q_abs.device
    if config.position in ("contiguous", "streaming", "full"):
        # [sinks | units in stream order | local] renumbered 0..K-1 (ReAttention).
        k_pos = torch.arange(n_keys, device=device)
        return [Placement(0, n_keys, k_pos, k_pos[n_keys - n_queries :], n_keys)]
    if config.position in ("infllm", "stacked"):
        # Local keys at their true distances; memory just beyond the local window.
        n_local = n_keys - window.n_memory
        local_pos = torch.arange(n_local, device=device)
        local = Placement(
            window.n_memory, n_keys, local_pos, local_pos[n_local - n_queries :], n_local
        )
        if not window.n_memory:
            return [local]
        return [_memory_placement(window, config, n_queries), local]
    if config.position == "selfextend":
        return _selfextend(window, config, max_positions)
    raise ValueError(f"unknown position policy '{config.position}'")


def _memory_placement(window: Window, config: MemoryConfig, n_queries: int) -> Placement:
    """infllm: every memory key at one distance, n_local (InfLLM). stacked: every unit (and the
    sinks) at the same place just beyond the local window, each keeping its own order."""
    device = window.q_abs.device
    memory_abs = window.k_abs[..., : window.n_memory]
    if config.position == "infllm":
        span = 1
        k_pos = torch.zeros_like(memory_abs)
    else:
        span = max(config.unit_size, config.n_init)
        offset = (memory_abs - window.unit_start) % config.unit_size
        k_pos = torch.where(memory_abs < window.unit_start, memory_abs, offset)
    q_pos = torch.full((n_queries,), config.n_local + span - 1, dtype=torch.long, device=device)
    return Placement(0, window.n_memory, k_pos, q_pos, config.n_local + span)


def _selfextend(window: Window, config: MemoryConfig, max_positions: int) -> list[Placement]:
    """Neighbours within W at true distances, farther keys at grouped positions (SelfExtend)."""
    group, neighbours = config.selfextend_group, config.selfextend_window
    n_keys = window.k.shape[2]
    q_abs, k_abs = window.q_abs, window.k_abs
    # Shift by a common base so positions stay small; only relative distances matter to RoPE.
    base = int(q_abs[0]) - neighbours + 1
    near_limit = int(q_abs[-1]) - base + 1
    near = Placement(
        0, n_keys, (k_abs - base).clamp(0, near_limit - 1), q_abs - base, near_limit, 0, neighbours
    )
    k_group = k_abs // group
    q_group = q_abs // group + neighbours - neighbours // group
    # Past the model's range, the farthest keys share its farthest position.
    overflow = max(int(q_group[-1]) - (max_positions - 1), 0)
    far_limit = int(q_group[-1]) - overflow + 1
    far = Placement(
        0, n_keys, (k_group - overflow).clamp(0, far_limit - 1), q_group - overflow, far_limit,
        neighbours, None,
    )  # fmt: skip
    return [near, far]


def attend(
    q: torch.Tensor,
    window: Window,
    *,
    config: MemoryConfig,
    rotary: Rope,
    scale: float,
    want_mass: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention of a step's queries over its window, every placement under one softmax.

    Args:
        q: [B, Hq, T, D] pre-RoPE queries.
    Returns:
        out [B, Hq, T, D] fp32, and (if `want_mass`) the attention mass each local key received,
        summed over queries and heads: [B, Hkv, K - n_memory] fp32.
    """
    parts = placements(window, config, rotary.max_positions)
    batch, n_kv_heads = window.k.shape[:2]
    # Placements in key order over the window, or (selfextend) over copies of it.
    consecutive = all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False))
    if consecutive and parts[0].start == 0 and parts[-1].stop == window.k.shape[2]:
        k, v, k_abs = window.k, window.v, window.k_abs
    else:
        k = torch.cat([window.k[:, :, p.start : p.stop] for p in parts], dim=2)
        v = torch.cat([window.v[:, :, p.start : p.stop] for p in parts], dim=2)
        k_abs = torch.cat([window.k_abs[..., p.start : p.stop] for p in parts], dim=-1)
    offsets, kernel_parts = [], []
    for part in parts:
        first = sum(p.stop - p.start for p in parts[: len(offsets)])
        offsets.append(first)
        kernel_parts.append((first, first + part.stop - part.start, part.min_dist, part.max_dist))
    k_pos = torch.cat([p.k_pos.expand(batch, n_kv_heads, -1) for p in parts], dim=-1)
    cos, sin = rotary.table(max(p.limit for p in parts), q.dtype, q.device)
    out, _, mass = placed_attention(
        q, k, v,
        q_pos=torch.stack([p.q_pos for p in parts]),
        k_pos=k_pos,
        q_abs=window.q_abs,
        k_abs=k_abs.expand(batch, n_kv_heads, -1),
        parts=kernel_parts, cos=cos, sin=sin, scale=scale,
        mass_from=window.n_memory if want_mass else None,
    )  # fmt: skip
    if not want_mass:
        return out, None
    return out, _local_mass(parts, offsets, mass, window)


def _local_mass(
    parts: list[Placement], offsets: list[int], mass: torch.Tensor, window: Window
) -> torch.Tensor:
    """Mass of each local key, [B, Hkv, L], from the mass of the placed keys from n_memory on."""
    local = torch.zeros(*mass.shape[:2], window.k.shape[2] - window.n_memory, device=mass.device)
    for part, offset in zip(parts, offsets, strict=True):
        first = max(part.start, window.n_memory)
        if first < part.stop:
            column = offset + first - part.start - window.n_memory
            local[..., first - window.n_memory : part.stop - window.n_memory] += mass[
                ..., column : column + part.stop - first
            ]
    return local
