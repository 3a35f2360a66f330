"""Position policies: where each key of a step's window sits, and the exact attention over it.

A window is `[memory (sinks + retrieved units, in stream order) | local]`. A policy cuts it into
segments, each with its own key and query positions and a distance mask; segments are attended
separately and merged exactly by log-sum-exp. Every position stays inside the model's trained range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from agentmem.config import MemoryConfig
from agentmem_kernels import attention, merge, rope


class Rope(Protocol):
    """The model's own rotary embedding, evaluated at chosen positions."""

    max_positions: int

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape `positions.shape + (D,)`."""
        ...


@dataclass
class Window:
    """The keys one step attends to, pre-RoPE, with their indices in the stream."""

    k: torch.Tensor  # [B, Hkv, K, D]
    v: torch.Tensor  # [B, Hkv, K, D]
    k_abs: torch.Tensor  # [K] or [B, Hkv, K]
    n_memory: int  # keys before the local part
    q_abs: torch.Tensor  # [T]


@dataclass
class Segment:
    """Part of a window under one position map; key j is visible to query t iff
    `min_dist <= q_abs[t] - k_abs[j] < max_dist`."""

    start: int
    stop: int
    k_pos: torch.Tensor  # [stop - start] or [B, Hkv, stop - start]
    q_pos: torch.Tensor  # [T]
    min_dist: int = 0
    max_dist: int | None = None


def segments(window: Window, config: MemoryConfig, max_positions: int) -> list[Segment]:
    """The segments of `window` under `config.position`."""
    n_keys = window.k.shape[2]
    n_queries = window.q_abs.shape[0]
    device = window.q_abs.device
    if config.position in ("contiguous", "streaming", "full"):
        # [sinks | units in stream order | local] renumbered 0..K-1 (ReAttention).
        k_pos = torch.arange(n_keys, device=device)
        return [Segment(0, n_keys, k_pos, k_pos[n_keys - n_queries :])]
    if config.position == "infllm":
        # Local keys at their true distances; all memory at one distance, n_local (InfLLM).
        n_local = n_keys - window.n_memory
        local_pos = torch.arange(n_local, device=device)
        parts = [Segment(window.n_memory, n_keys, local_pos, local_pos[n_local - n_queries :])]
        if window.n_memory:
            zeros = torch.zeros(window.n_memory, dtype=torch.long, device=device)
            q_pos = torch.full((n_queries,), config.n_local, dtype=torch.long, device=device)
            parts.append(Segment(0, window.n_memory, zeros, q_pos))
        return parts
    if config.position == "selfextend":
        return _selfextend_segments(window, config, max_positions)
    raise ValueError(f"unknown position policy '{config.position}'")


def _selfextend_segments(window: Window, config: MemoryConfig, max_positions: int) -> list[Segment]:
    """Neighbours within W at true distances, farther keys at grouped positions (SelfExtend)."""
    group, neighbours = config.selfextend_group, config.selfextend_window
    n_keys = window.k.shape[2]
    q_abs, k_abs = window.q_abs, window.k_abs
    # Shift by a common base so positions stay small; only relative distances matter to RoPE.
    base = int(q_abs[0]) - neighbours + 1
    near = Segment(0, n_keys, (k_abs - base).clamp(min=0), q_abs - base, 0, neighbours)
    k_group = k_abs // group
    q_group = q_abs // group + neighbours - neighbours // group
    # Past the model's range, the farthest keys share its farthest position.
    overflow = max(int(q_group[-1]) - (max_positions - 1), 0)
    far = Segment(
        0, n_keys, (k_group - overflow).clamp(min=0), q_group - overflow, neighbours, None
    )
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
    """Exact attention of a step's queries over its window.

    Args:
        q: [B, Hq, T, D] pre-RoPE queries.
    Returns:
        out [B, Hq, T, D] fp32, and (if `want_mass`) the attention mass each local key received,
        summed over queries and heads: [B, Hkv, K - n_memory] fp32.
    """
    results = []
    parts = segments(window, config, rotary.max_positions)
    for seg in parts:
        cos_q, sin_q = rotary.cos_sin(seg.q_pos, q.dtype)
        cos_k, sin_k = rotary.cos_sin(seg.k_pos, window.k.dtype)
        k_abs = window.k_abs[..., seg.start : seg.stop]
        out, lse, probs = attention(
            rope(q, cos_q, sin_q),
            rope(window.k[:, :, seg.start : seg.stop], cos_k, sin_k),
            window.v[:, :, seg.start : seg.stop],
            scale=scale,
            q_abs=window.q_abs,
            k_abs=k_abs,
            min_dist=seg.min_dist,
            max_dist=seg.max_dist,
            return_lse=len(parts) > 1,
            return_probs=want_mass,
        )
        results.append((seg, out, lse, probs))

    out, lse = results[0][1], results[0][2]
    for _, out_b, lse_b, _ in results[1:]:
        out, lse = merge(out, lse, out_b, lse_b)
    if not want_mass:
        return out, None
    return out, _local_mass(results, lse, window)


def _local_mass(results: list, lse_total: torch.Tensor, window: Window) -> torch.Tensor:
    """Attention mass received by each local key, under the merged softmax."""
    batch, n_kv_heads = window.k.shape[:2]
    n_local = window.k.shape[2] - window.n_memory
    mass = torch.zeros(batch, n_kv_heads, n_local, device=window.k.device)
    for seg, _, lse, probs in results:
        first = max(seg.start, window.n_memory)
        if first >= seg.stop:
            continue
        weight = torch.exp(lse - lse_total).nan_to_num(0.0).unsqueeze(-1)  # [B, Hq, T, 1]
        part = probs[..., first - seg.start :] * weight  # [B, Hq, T, n]
        part = part.view(batch, n_kv_heads, -1, *part.shape[2:]).sum(dim=(2, 3))
        mass[..., first - window.n_memory : seg.stop - window.n_memory] += part
    return mass
