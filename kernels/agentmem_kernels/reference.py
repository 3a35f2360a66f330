"""Exact pure-torch references of every agentmem kernel: the ground truth kernels are tested on.

Layout is transformers' own, `[B, H, T, D]` (batch, heads, tokens, head dim); key/value heads `Hkv`
divide query heads `Hq` (GQA). Everything is computed in fp32 and returned in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' half-split convention, computed in the dtype of `x`.

    x: [..., T, D]; cos, sin: broadcastable to x, computed by the model's own rotary module.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@dataclass
class KeySegment:
    """Keys attended under one position map: the queries and keys rotated for it, and which keys
    each query may see (key j is visible to query t iff min_dist <= q_abs[t] - k_abs[j] < max_dist).

    q: [B, Hq, T, D]; k, v: [B, Hkv, K, D]; k_abs: [K] or [B, Hkv, K] stream indices.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_abs: torch.Tensor
    min_dist: int = 0
    max_dist: int | None = None


def segment_attention(
    segments: list[KeySegment],
    *,
    q_abs: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention of the same queries over several key segments under one softmax.

    Equal to attending each segment separately and merging by log-sum-exp (`merge`). A query that
    sees no key gets output 0 and lse -inf. With one segment and neither lse nor probs asked for,
    torch's fused `scaled_dot_product_attention` computes it (every query must then see a key); on
    the CPU without probs, torch's flash kernel attends each segment and returns its lse, and the
    segments are merged (`_flash_segments`).

    Args:
        q_abs: [T] stream index of each query.
    Returns:
        out [B, Hq, T, D] fp32; lse [B, Hq, T] (log of the softmax normaliser of the scaled logits)
        or None; probs [B, Hq, T, sum of K] (segments in order) or None.
    """
    batch, n_q_heads, n_queries, head_dim = segments[0].q.shape
    n_kv_heads = segments[0].k.shape[1]
    group = n_q_heads // n_kv_heads
    masks = [_visible(q_abs, seg.k_abs, seg.min_dist, seg.max_dist) for seg in segments]

    if len(segments) == 1 and not return_lse and not return_probs:
        seg, visible = segments[0], masks[0]
        if visible.dim() == 5:
            visible = visible.expand(-1, -1, group, -1, -1).flatten(1, 2)  # [B, Hq, T, K]
        out = torch.nn.functional.scaled_dot_product_attention(
            seg.q.float(), seg.k.float(), seg.v.float(), attn_mask=visible, scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        return out, None, None
    if not return_probs and _cpu_flash_with_lse(segments[0].q):
        out, lse = _flash_segments(segments, masks, scale)
        return out, lse if return_lse else None, None

    logits = []
    for seg, visible in zip(segments, masks, strict=True):
        qg = seg.q.float().view(batch, n_kv_heads, group, n_queries, head_dim)
        part = torch.einsum("bhgtd,bhkd->bhgtk", qg, seg.k.float()) * scale  # [B, Hkv, G, T, K]
        logits.append(part.masked_fill_(~visible, float("-inf")))
    logits = torch.cat(logits, dim=-1)
    if return_lse:
        lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G, T]
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(logits - safe.unsqueeze(-1))  # rows that see nothing: 0
    else:
        lse = None
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # rows that see nothing: 0
    values = torch.cat([seg.v.float() for seg in segments], dim=2)
    out = torch.einsum("bhgtk,bhkd->bhgtd", probs, values).reshape(batch, n_q_heads, n_queries, -1)
    if lse is not None:
        lse = lse.reshape(batch, n_q_heads, n_queries)
    if return_probs:
        return out, lse, probs.reshape(batch, n_q_heads, n_queries, -1)
    return out, lse, None


def _cpu_flash_with_lse(q: torch.Tensor) -> bool:
    """Whether torch's CPU flash attention, which also returns the lse, takes this query."""
    return q.device.type == "cpu" and _cpu_flash_takes_a_mask()


@functools.cache
def _cpu_flash_takes_a_mask() -> bool:
    """Whether this torch has the CPU flash kernel with a mask argument (2.3 on)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op is not None and "attn_mask" in str(op.default._schema)


def _flash_segments(
    segments: list[KeySegment], masks: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_attention`'s out and lse, each segment through torch's CPU flash kernel, merged.

    A key head's query heads are folded into its queries ([B, Hkv, G x T, D]), so keys and values
    are never repeated; the mask is additive (0 or -inf), none where every key is visible. On two
    cores, a 512-query chunk over 2,048 keys took 22 ms rather than 163 (head size 64, 7 query
    heads a key head) and 21 rather than 49 (256, 4), against materialising every logit.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, n_q_heads, n_queries, head_dim = segments[0].q.shape
    n_kv_heads = segments[0].k.shape[1]
    group = n_q_heads // n_kv_heads
    out = lse = None
    for seg, visible in zip(segments, masks, strict=True):
        q = seg.q.float().reshape(batch, n_kv_heads, group * n_queries, head_dim)
        if visible.dim() == 5:  # per-head keys: [B, Hkv, 1, T, K]
            visible = visible.expand(-1, -1, group, -1, -1).flatten(2, 3)
        else:
            visible = visible.repeat(group, 1)  # [G x T, K]
        sees = visible.any(-1)  # rows that see no key get 0 and -inf, not the kernel's NaN
        bias = None
        if not bool(visible.all()):
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=q.device)
            bias.masked_fill_(~visible, float("-inf"))
            bias.masked_fill_(~sees.unsqueeze(-1), 0.0)
        part, part_lse = flash(q, seg.k.float(), seg.v.float(), attn_mask=bias, scale=scale)
        part = torch.where(sees.unsqueeze(-1), part, 0.0)
        part_lse = torch.where(sees, part_lse, float("-inf"))
        if out is None:
            out, lse = part, part_lse
        else:
            out, lse = merge(out, lse, part, part_lse)
    out = out.view(batch, n_kv_heads, group, n_queries, head_dim).reshape(
        batch, n_q_heads, n_queries, head_dim
    )
    return out, lse.reshape(batch, n_q_heads, n_queries)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_abs: torch.Tensor,
    k_abs: torch.Tensor,
    min_dist: int = 0,
    max_dist: int | None = None,
    return_lse: bool = True,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`segment_attention` over a single segment (see `KeySegment` for the arguments)."""
    segment = KeySegment(q, k, v, k_abs, min_dist, max_dist)
    return segment_attention(
        [segment], q_abs=q_abs, scale=scale, return_lse=return_lse, return_probs=return_probs
    )


def _visible(
    q_abs: torch.Tensor, k_abs: torch.Tensor, min_dist: int, max_dist: int | None
) -> torch.Tensor:
    """[T, K], or [B, Hkv, 1, T, K] for per-head keys: which keys each query sees."""
    dist = q_abs.view(-1, 1) - k_abs.unsqueeze(-2)
    visible = dist >= min_dist
    if max_dist is not None:
        visible &= dist < max_dist
    return visible.unsqueeze(2) if visible.dim() == 4 else visible


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of two attentions of the same queries over disjoint key sets.

    out: [B, H, T, D], lse: [B, H, T]; a side with lse -inf (no visible key) gets weight 0.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse


def score_units(
    q: torch.Tensor,
    reps: torch.Tensor,
    *,
    kind: str,
    scale: float,
    k: int,
    n_valid: torch.Tensor | None = None,
    ascending: bool = True,
) -> torch.Tensor:
    """Exact top-k units for a step's queries, for every (batch, key head) set at once.

    A unit's score is its `unit_mass`; the k largest are returned.

    Args:
        q: [B, Hq, T, D] queries rotated to the scoring distance.
        reps: [B, Hkv, N, R, D] representatives ([B, Hkv, N, 2R, D] for minmax).
        k: units to return, <= N (and <= n_valid).
        n_valid: optional int tensor of one element: only units below it exist (the rest of
            `reps` is spare capacity). A tensor, not a number, so that no step reads it back.
        ascending: the ids in stream order, else by rank (`top_units`).
    Returns:
        [B, Hkv, k] int64 unit ids.
    """
    mass = unit_mass(q, reps, kind=kind, scale=scale, n_valid=n_valid)
    return top_units(mass, k, ascending=ascending)


def top_units(mass: torch.Tensor, k: int, *, ascending: bool = True) -> torch.Tensor:
    """Ids [B, Hkv, k] of the k units of largest mass [B, Hkv, N]: ascending (the units' order
    in the stream), or, `ascending=False`, by rank, the largest mass first (a step that reads
    them in place, where the order changes nothing; ties in either order)."""
    if not ascending:
        return torch.topk(mass, k, dim=-1).indices
    return torch.sort(torch.topk(mass, k, dim=-1, sorted=False).indices, dim=-1).values


def unit_mass(
    q: torch.Tensor,
    reps: torch.Tensor,
    *,
    kind: str,
    scale: float,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """How much attention the step's queries would give each unit: [B, Hkv, N] fp32.

    A unit's logit for one query is its best representative's: `max_r q . rep_r` (`kind="dot"`), or
    for bounding boxes the upper bound `max_r sum_d max(q_d min_rd, q_d max_rd)` (`kind="minmax"`,
    reps hold R mins then R maxes). Each query spreads a unit mass over units by a softmax of its
    scaled logits; a unit's mass is summed over the step's queries and the group's heads, so a few
    sharp queries are not drowned by many indifferent ones and the set is shared by the heads that
    read the same key head. Units at or past `n_valid` get mass -1.
    """
    logits = unit_logits(q, reps, kind=kind) * scale  # [B, Hkv, G, T, N]
    valid = None
    if n_valid is not None:
        valid = torch.arange(reps.shape[2], device=reps.device) < n_valid.reshape(())
        logits = logits.masked_fill(~valid, float("-inf"))
    mass = torch.softmax(logits, dim=-1).sum(dim=(2, 3))  # [B, Hkv, N]
    return mass if valid is None else mass.masked_fill(~valid, -1.0)


def unit_logits(q: torch.Tensor, reps: torch.Tensor, *, kind: str) -> torch.Tensor:
    """Per-query logit of every unit: [B, Hq, T, D] x [B, Hkv, N, R, D] -> [B, Hkv, G, T, N]."""
    batch, n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads = reps.shape[1]
    qg = q.float().view(batch, n_kv_heads, n_q_heads // n_kv_heads, n_queries, head_dim)
    reps = reps.float()
    if kind == "dot":
        per_rep = torch.einsum("bhgtd,bhnrd->bhgtnr", qg, reps)
    elif kind == "minmax":
        half = reps.shape[3] // 2
        lows, highs = reps[:, :, :, :half], reps[:, :, :, half:]
        per_rep = torch.einsum("bhgtd,bhnrd->bhgtnr", qg.clamp(min=0), highs) + torch.einsum(
            "bhgtd,bhnrd->bhgtnr", qg.clamp(max=0), lows
        )
    else:
        raise ValueError(f"unknown unit score kind '{kind}'; expected 'dot' or 'minmax'")
    return per_rep.amax(dim=-1)


def gather_units(pool: torch.Tensor, ids: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Keys or values of the chosen units, in the order of `ids`.

    pool: [B, H, N * unit_size, D]; ids: [B, H, k] -> [B, H, k * unit_size, D].
    """
    offsets = torch.arange(unit_size, device=ids.device)
    token_ids = (ids.unsqueeze(-1) * unit_size + offsets).flatten(-2)  # [B, H, k * U]
    index = token_ids.unsqueeze(-1).expand(-1, -1, -1, pool.shape[-1])
    return torch.gather(pool, 2, index)


def placed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_abs: torch.Tensor,
    k_abs: torch.Tensor,
    parts: list[tuple[int, int, int, int | None]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    mass_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention over a window of pre-RoPE keys cut into placements, rotated to assigned positions.

    Placement p covers keys `[start, stop)` of the window and sees key j from query t iff
    `min_dist <= q_abs[t] - k_abs[j] < max_dist`; its queries sit at `q_pos[p]`. All placements
    share one softmax.

    Args:
        q: [B, Hq, T, D] pre-RoPE queries; k, v: [B, Hkv, K, D] pre-RoPE keys and values.
        q_pos: [P, T] query positions per placement; k_pos, k_abs: [B, Hkv, K]; q_abs: [T].
        parts: P tuples (start, stop, min_dist, max_dist or None), in key order.
        cos, sin: [N, D] tables of the model's rotary module, indexed by position.
        mass_from: if given, also return the attention each key from this index on received,
            summed over queries and the key head's query heads.
    Returns:
        out [B, Hq, T, D] fp32, lse [B, Hq, T] fp32, mass [B, Hkv, K - mass_from] fp32 or None.
    """
    segments = _rotated_segments(q, k, v, q_pos, k_pos, k_abs, parts, cos, sin)
    out, lse, probs = segment_attention(
        segments, q_abs=q_abs, scale=scale, return_lse=True, return_probs=mass_from is not None
    )
    if mass_from is None:
        return out, lse, None
    per_key = probs.view(*k.shape[:2], -1, *probs.shape[2:]).sum(dim=(2, 3))  # [B, Hkv, K]
    return out, lse, per_key[..., mass_from:]


def key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    lse: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_abs: torch.Tensor,
    k_abs: torch.Tensor,
    parts: list[tuple[int, int, int, int | None]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    mass_from: int,
) -> torch.Tensor:
    """The `mass` of `placed_attention` recomputed from its lse, for keys from `mass_from` on."""
    batch, n_q_heads, n_queries, _ = q.shape
    n_kv_heads = k.shape[1]
    lse = lse.view(batch, n_kv_heads, n_q_heads // n_kv_heads, n_queries, 1)
    mass = torch.zeros(batch, n_kv_heads, k.shape[2] - mass_from, device=q.device)
    for p, (start, stop, min_dist, max_dist) in enumerate(parts):
        first = max(start, mass_from)
        if first >= stop:
            continue
        keys = slice(first, stop)
        segment = _rotated_segments(
            q, k[:, :, keys], k[:, :, keys], q_pos[p : p + 1], k_pos[:, :, keys],
            k_abs[:, :, keys], [(0, stop - first, min_dist, max_dist)], cos, sin,
        )[0]  # fmt: skip
        qg = segment.q.view(batch, n_kv_heads, -1, n_queries, segment.q.shape[-1])
        logits = torch.einsum("bhgtd,bhkd->bhgtk", qg, segment.k) * scale
        visible = _visible(q_abs, segment.k_abs, min_dist, max_dist)
        probs = torch.exp(logits.masked_fill(~visible, float("-inf")) - lse).nan_to_num(0.0)
        mass[..., first - mass_from : stop - mass_from] += probs.sum(dim=(2, 3))
    return mass


def _rotated_segments(q, k, v, q_pos, k_pos, k_abs, parts, cos, sin) -> list[KeySegment]:
    segments = []
    for p, (start, stop, min_dist, max_dist) in enumerate(parts):
        keys = slice(start, stop)
        positions = k_pos[:, :, keys]
        segments.append(
            KeySegment(
                q=rope(q.float(), cos[q_pos[p]].float(), sin[q_pos[p]].float()),
                k=rope(k[:, :, keys].float(), cos[positions].float(), sin[positions].float()),
                v=v[:, :, keys],
                k_abs=k_abs[:, :, keys],
                min_dist=min_dist,
                max_dist=max_dist,
            )
        )
    return segments


def memory_attention(
    q: torch.Tensor,
    *,
    sink_k: torch.Tensor | None,
    sink_v: torch.Tensor | None,
    pool_k: torch.Tensor | None,
    pool_v: torch.Tensor | None,
    ids: torch.Tensor | None,
    unit_size: int,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    n_local: int | torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    memory_q_pos: int,
    stacked: bool = False,
    local_rotated: bool = False,
    with_local_mass: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A step's attention over `[sinks | units of the pool chosen by ids | local]`, one softmax.

    The InfLLM window read in place: units are addressed through the index table `ids`, never
    copied, and the local window is the first `n_local` keys of its buffer, the step's keys last.
    Positions (keys rotated to them, pre-RoPE in storage):
      - local key j sits at j, the step's query t at `n_local - T + t`, and sees local keys <= it;
      - every memory key sits at 0 (InfLLM) or, `stacked`, a sink at its index and a unit's token
        at its offset in the unit; every query sees every memory key from `memory_q_pos`.

    Args:
        q: [B, Hq, T, D] pre-RoPE queries, the last T tokens of the local window.
        sink_k, sink_v: [B, Hkv, S, D] or None; pool_k, pool_v: [B, Hkv, N * unit_size, D] or None.
        ids: [B, Hkv, k] unit ids into the pool, or None.
        local_k, local_v: [B, Hkv, C, D] buffers whose first `n_local` keys are the local window.
        n_local: int, or an int tensor of one element (read on the device by the kernel).
        cos, sin: [N, D] tables of the model's rotary module.
        local_rotated: the local keys are stored already rotated to their positions j.
        with_local_mass: also return the attention each local key received (`local_key_mass`).
        out_dtype: the output's dtype (a model's own: no conversion after the kernel).
    Returns:
        out [B, Hq, T, D] (computed in fp32), lse [B, Hq, T] fp32, and the local keys' mass
        [B, Hkv, C] fp32 (0 past `n_local`) or None.
    """
    n = int(n_local)
    n_queries = q.shape[2]
    device = q.device
    mem_k, mem_v, mem_pos = [], [], []
    if sink_k is not None and sink_k.shape[2]:
        mem_k.append(sink_k)
        mem_v.append(sink_v)
        mem_pos.append(torch.arange(sink_k.shape[2], device=device))
    if ids is not None and ids.shape[-1]:
        mem_k.append(gather_units(pool_k, ids, unit_size))
        mem_v.append(gather_units(pool_v, ids, unit_size))
        mem_pos.append(torch.arange(unit_size, device=device).repeat(ids.shape[-1]))
    n_memory = sum(part.shape[2] for part in mem_k)
    k = torch.cat([*mem_k, local_k[:, :, :n]], dim=2)
    v = torch.cat([*mem_v, local_v[:, :, :n]], dim=2)
    local_pos = torch.arange(n, device=device)
    memory_pos = torch.cat(mem_pos) if stacked and mem_pos else torch.zeros(n_memory, device=device)
    local_k_pos = local_pos
    if local_rotated:  # rotated already: position 0 (the identity, up to the table's scale)
        k = k.float()
        k[:, :, n_memory:] /= cos[0, 0].float()
        local_k_pos = torch.zeros_like(local_pos)
    k_pos = torch.cat((memory_pos.long(), local_k_pos)).expand(*k.shape[:2], -1)
    k_abs = torch.cat((torch.full((n_memory,), -1, device=device), local_pos))
    q_abs = local_pos[n - n_queries :]
    parts, q_pos = [(n_memory, n_memory + n, 0, None)], [q_abs]
    if n_memory:
        parts.insert(0, (0, n_memory, 0, None))
        q_pos.insert(0, torch.full_like(q_abs, memory_q_pos))
    out, lse, mass = placed_attention(
        q, k, v, q_pos=torch.stack(q_pos), k_pos=k_pos, q_abs=q_abs,
        k_abs=k_abs.expand(*k.shape[:2], -1), parts=parts, cos=cos, sin=sin, scale=scale,
        mass_from=n_memory if with_local_mass else None,
    )  # fmt: skip
    if mass is not None:  # the same softmax's probabilities: no second pass
        mass = torch.nn.functional.pad(mass, (0, local_k.shape[2] - n))
    return out.to(out_dtype), lse, mass


def local_key_mass(
    q: torch.Tensor,
    local_k: torch.Tensor,
    *,
    n_local: int | torch.Tensor,
    lse: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    local_rotated: bool = False,
) -> torch.Tensor:
    """Attention each local key received in `memory_attention` (positions as there), from its lse,
    summed over the step's queries and the key head's query heads: [B, Hkv, C] fp32, 0 past
    `n_local`. Static shapes, no read-back: it runs inside a captured decode step."""
    batch, n_q_heads, n_queries, _ = q.shape
    n_kv_heads, capacity = local_k.shape[1], local_k.shape[2]
    offsets = torch.arange(n_queries, device=q.device)
    if isinstance(n_local, int):  # no host-to-device copy: captured steps pass numbers too
        q_pos = (offsets + (n_local - n_queries)).clamp(min=0)
    else:
        q_pos = (n_local.reshape(()) - n_queries + offsets).clamp(min=0)
    k_pos = torch.arange(capacity, device=q.device)
    queries = rope(q.float(), cos[q_pos].float(), sin[q_pos].float())
    keys = local_k.float()
    if not local_rotated:
        keys = rope(keys, cos[:capacity].float(), sin[:capacity].float())
    queries = queries.view(batch, n_kv_heads, n_q_heads // n_kv_heads, n_queries, -1)
    logits = torch.einsum("bhgtd,bhkd->bhgtk", queries, keys) * scale
    visible = k_pos <= q_pos[:, None]  # [T, C]; also keeps keys past n_local out
    lse = lse.view(batch, n_kv_heads, -1, n_queries, 1)
    probs = torch.exp(logits.masked_fill(~visible, float("-inf")) - lse).nan_to_num(0.0)
    return probs.sum(dim=(2, 3))


def copy_units(
    src_k: torch.Tensor, src_v: torch.Tensor, ids: torch.Tensor,
    dst_k: torch.Tensor, dst_v: torch.Tensor, slots: torch.Tensor, unit_size: int,
) -> None:  # fmt: skip
    """Copy units `ids` of one pool into the unit slots `slots` of another, where a slot is >= 0.

    src_k, src_v: [B, H, N * unit_size, D]; dst_k, dst_v: [B, H, P * unit_size, D]; either pair
    may be in host memory (a tiered memory's pool: fetched from, or packed into). ids, slots:
    [B, H, k] int on the device that runs the copy; -1 slots copy nothing. The reference reads
    the wanted pairs back to the host (no graph captures it).
    """
    b, h, j = (slots >= 0).nonzero(as_tuple=True)
    if not len(b):
        return
    offsets = torch.arange(unit_size, device=slots.device)
    src_rows = (ids[b, h, j].unsqueeze(-1) * unit_size + offsets).flatten()
    dst_rows = (slots[b, h, j].unsqueeze(-1) * unit_size + offsets).flatten()
    b, h = b.repeat_interleave(unit_size), h.repeat_interleave(unit_size)
    on_src = [index.to(src_k.device) for index in (b, h, src_rows)]
    on_dst = [index.to(dst_k.device) for index in (b, h, dst_rows)]
    for src, dst in ((src_k, dst_k), (src_v, dst_v)):
        dst[on_dst[0], on_dst[1], on_dst[2]] = src[on_src[0], on_src[1], on_src[2]].to(
            dst.device, dst.dtype
        )


def fetch_units(
    ids: torch.Tensor, slot_of: torch.Tensor, unit_of: torch.Tensor, last_used: torch.Tensor,
    counters: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One step's lookup in a device cache of P unit slots per (batch row, head), least recently
    used out first: the tables are updated in place for units `ids` [B, H, k] (distinct per row).

    Tables, each with one scratch column at its end for masked writes: slot_of [B, H, C + 1] the
    slot of unit u or -1; unit_of [B, H, P + 1] the unit in slot s or -1; last_used [B, H, P + 1]
    the step that last used slot s or -1, its scratch column the row's step count. counters [2]
    int64: [hits, lookups], added to. Every op stays on the device (capturable).

    Returns the slots holding the units after this step [B, H, k], and the slots the caller must
    copy each missing unit into (-1 for a hit).
    """
    ids = ids.long()
    n_slots, scratch_unit = unit_of.shape[2] - 1, slot_of.shape[2] - 1
    now = (last_used[:, :, n_slots:] + 1).expand(ids.shape)
    slots = slot_of.gather(2, ids)
    hit = slots >= 0
    miss = ~hit
    last_used.scatter_(2, torch.where(hit, slots, n_slots), now)
    # The least recently used slots, oldest first (ties by slot: the key is unique); the step's
    # hits were just used, so the first `misses` of them are all free to take.
    age = last_used[:, :, :n_slots] * (n_slots + 1)
    age += torch.arange(n_slots, device=ids.device)
    oldest = age.topk(ids.shape[2], dim=2, largest=False).indices
    victim = oldest.gather(2, (miss.long().cumsum(2) - 1).clamp(min=0))
    evicted = unit_of.gather(2, victim)
    slot_of.scatter_(2, torch.where(miss & (evicted >= 0), evicted, scratch_unit), -1)
    slot_of.scatter_(2, torch.where(miss, ids, scratch_unit), victim)
    unit_of.scatter_(2, torch.where(miss, victim, n_slots), ids)
    last_used.scatter_(2, torch.where(miss, victim, n_slots), now)
    last_used[:, :, n_slots:] = now[:, :, :1]
    counters[0:1].add_(hit.sum())
    counters[1:2].add_(hit.numel())
    return torch.where(hit, slots, victim), torch.where(miss, victim, -1)


def append_token(
    k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, *,
    local_k: torch.Tensor, local_v: torch.Tensor, local_mass: torch.Tensor,
    local_rotated: torch.Tensor, queries: torch.Tensor, counts: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, query_position: int,
) -> None:  # fmt: skip
    """A decoding step's bookkeeping in a fixed-shape local window, counts on the device.

    k, v: [B, Hkv, 1, D] the new pre-RoPE key and value; q: [B, Hq, 1, D] its pre-RoPE query.
    local_k, local_v, local_rotated: [B, Hkv, C, D] buffers; local_mass [B, Hkv, C] fp32;
    queries: [B, Hq, W, D] a ring of the latest scoring queries. counts: int32 [3], the local
    length L, the unit count (untouched) and the ring's next slot P. cos, sin: fp32 [N, D] tables.

    Writes slot L of the window: k, v, zero mass and k rotated to position L; writes slot P of
    the ring: q rotated to `query_position` (the scoring distance); then L += 1 and P = (P + 1)
    mod W. Rotations are computed in fp32 and stored in the buffers' dtype. Nothing is read back.
    """
    slot = counts[0:1].long()
    ring = counts[2:3].long()
    rotated = rope(k.float(), cos.index_select(0, slot), sin.index_select(0, slot))
    local_k.index_copy_(2, slot, k.to(local_k.dtype))
    local_v.index_copy_(2, slot, v.to(local_v.dtype))
    local_mass.index_fill_(2, slot, 0.0)
    local_rotated.index_copy_(2, slot, rotated.to(local_rotated.dtype))
    scoring = rope(q.float(), cos[query_position], sin[query_position])
    queries.index_copy_(2, ring, scoring.to(queries.dtype))
    counts[0:1].add_(1)
    counts[2:3].copy_((counts[2:3] + 1) % queries.shape[2])
