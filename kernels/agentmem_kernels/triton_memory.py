"""Triton kernels of a memory step:

- `memory_attention`: the window read in place (sinks, units of the pool through an index table,
  the local window), keys rotated in-kernel where they are not stored rotated, one online softmax
  in base 2, GQA rows, split-K for decode with a fused exact merge;
- `unit_mass`: representative scoring for every (batch, key head) in one launch per pass (softmax
  statistics, then mass), never a [queries x units x representatives] tensor in memory;
- `local_key_mass`: the attention each local key received, from the attention's lse.

Counts that change from step to step (the local window's length, the number of units) may be device
tensors, read in the kernels: a captured step reads nothing back. Where the host knows them, plain
integers avoid a host-to-device copy (which would synchronise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agentmem_kernels import reference, triton_attention
from agentmem_kernels.fit import launch_fitted
from agentmem_kernels.triton_attention import FP32_DOT, supports

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)


@triton.jit
def _count(value, FROM_DEVICE: tl.constexpr):
    """A count given as a device tensor (read here: nothing is read back to the host, so a graph
    can capture the step) or as a plain integer (no host-to-device copy)."""
    if FROM_DEVICE:
        count = tl.load(value)
    else:
        count = value
    return count


@triton.jit
def _rotated(x, p_x, b_pos, m_x, cos, sin, stride_cn, D: tl.constexpr):
    """Rows `x` [R, D] (loaded from row pointers p_x [R]) rotated to positions b_pos [R], in
    transformers' half-split convention: x * cos + rotate_half(x) * sin, in fp32."""
    o_d = tl.arange(0, D)
    o_swap = (o_d + D // 2) % D
    sign = tl.where(o_d < D // 2, -1.0, 1.0)
    b_swap = tl.load(p_x[:, None] + o_swap[None, :], mask=m_x[:, None], other=0.0).to(tl.float32)
    p_c = b_pos[:, None] * stride_cn + o_d[None, :]
    return x.to(tl.float32) * tl.load(cos + p_c) + b_swap * sign[None, :] * tl.load(sin + p_c)


@triton.jit
def _attend_block(
    b_q, p_k, p_v, m_k, b_kpos, m_vis, cos, sin, stride_cn, b_m, b_l, b_acc, qk_scale,
    D: tl.constexpr, ROTATE: tl.constexpr, EXACT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One block of keys into the online softmax (base-2 logits). b_q [BM, D]: rotated queries;
    p_k, p_v [BN]: row pointers; m_k [BN]: keys that exist; m_vis [BM, BN]: which key each row
    sees; ROTATE: rotate the keys to b_kpos here (else they are stored rotated, or sit at position
    0). MASKED=False: every row sees every key of the block, so no mask is applied (most blocks)."""
    o_d = tl.arange(0, D)
    if MASKED:
        b_k = tl.load(p_k[:, None] + o_d[None, :], mask=m_k[:, None], other=0.0)
    else:
        b_k = tl.load(p_k[:, None] + o_d[None, :])
    if ROTATE:
        b_k = _rotated(b_k, p_k, b_kpos, m_k, cos, sin, stride_cn, D)
    b_k = b_k.to(b_q.dtype)
    if EXACT:  # fp32 inputs: near-fp32 products (FP32_DOT), not one tf32 pass
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=FP32_DOT)
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    if MASKED:
        b_s = tl.where(m_vis & m_k[None, :], b_s * qk_scale, float("-inf"))
    else:
        b_s = b_s * qk_scale
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows that saw nothing yet
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_p = tl.exp2(b_s - b_m_safe[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if MASKED:
        b_v = tl.load(p_v[:, None] + o_d[None, :], mask=m_k[:, None], other=0.0)
    else:
        b_v = tl.load(p_v[:, None] + o_d[None, :])
    if EXACT:
        b_pv = tl.dot(b_p, b_v.to(tl.float32), input_precision=FP32_DOT)
    else:
        b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
    return b_m_new, b_l, b_acc * b_alpha[:, None] + b_pv


@triton.jit
def memory_attention_fwd_kernel(
    q, sink_k, sink_v, pool_k, pool_v, ids, local_k, local_v, n_local, cos, sin,
    acc_out, m_out, l_out,
    qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_sb, stride_sh, stride_sk,
    stride_pb, stride_ph, stride_pk,
    stride_ib, stride_ih,
    stride_lb, stride_lh, stride_lk,
    stride_cn,
    T, HKV, ROWS, N_SINKS, N_UNIT_KEYS, MEM_Q_POS,
    G: tl.constexpr, D: tl.constexpr, U: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NSPLIT: tl.constexpr,
    STACKED: tl.constexpr, ROTATE_LOCAL: tl.constexpr, EXACT: tl.constexpr,
    N_ON_DEVICE: tl.constexpr, EVEN_MEMORY: tl.constexpr,
):  # fmt: skip
    i_bh, i_m, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_r = i_m * BM + tl.arange(0, BM)  # rows: g * T + t
    m_r = o_r < G * T
    i_g, i_t = o_r // T, o_r % T
    o_d = tl.arange(0, D)
    dot_ty = q.dtype.element_ty
    n = _count(n_local, N_ON_DEVICE)

    p_q = q + i_b * stride_qb + (i_h * G + i_g) * stride_qh + i_t * stride_qt  # [BM]
    b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_r[:, None], other=0.0)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, D], tl.float32)

    # Memory: every query sees every key, from one position. InfLLM puts every memory key at 0
    # (no rotation: cos 1, sin 0); stacked puts sinks at their index, unit tokens at their offset.
    b_mq = _rotated(b_q, p_q, tl.zeros([BM], tl.int32) + MEM_Q_POS, m_r, cos, sin, stride_cn, D)
    b_mq = b_mq.to(dot_ty)
    # Position 0 is the identity up to the table's own scale (cos[0] = the model's attention
    # scaling, 1 but for YaRN-like ropes; sin[0] = 0): unrotated keys take that factor here.
    if STACKED:
        mem_scale = qk_scale
    else:
        mem_scale = qk_scale * tl.load(cos)
    per_split = tl.cdiv(tl.cdiv(N_SINKS, BN), NSPLIT) * BN
    lo = i_s * per_split
    for i_k in range(lo, tl.minimum(lo + per_split, N_SINKS), BN):
        o_k = i_k + tl.arange(0, BN)
        m_k = o_k < N_SINKS
        p_k = sink_k + i_b * stride_sb + i_h * stride_sh + o_k * stride_sk
        p_v = sink_v + i_b * stride_sb + i_h * stride_sh + o_k * stride_sk
        b_m, b_l, b_acc = _attend_block(
            b_mq, p_k, p_v, m_k, o_k, m_r[:, None], cos, sin, stride_cn,
            b_m, b_l, b_acc, mem_scale, D, STACKED, EXACT, not EVEN_MEMORY,
        )  # fmt: skip
    per_split = tl.cdiv(tl.cdiv(N_UNIT_KEYS, BN), NSPLIT) * BN
    lo = i_s * per_split
    for i_k in range(lo, tl.minimum(lo + per_split, N_UNIT_KEYS), BN):
        o_k = i_k + tl.arange(0, BN)
        m_k = o_k < N_UNIT_KEYS
        b_id = tl.load(ids + i_b * stride_ib + i_h * stride_ih + o_k // U, mask=m_k, other=0)
        o_row = b_id.to(tl.int64) * U + o_k % U  # the unit's row in the pool
        p_k = pool_k + i_b * stride_pb + i_h * stride_ph + o_row * stride_pk
        p_v = pool_v + i_b * stride_pb + i_h * stride_ph + o_row * stride_pk
        b_m, b_l, b_acc = _attend_block(
            b_mq, p_k, p_v, m_k, o_k % U, m_r[:, None], cos, sin, stride_cn,
            b_m, b_l, b_acc, mem_scale, D, STACKED, EXACT, not EVEN_MEMORY,
        )  # fmt: skip
    # Local window: true distances, causal; the queries are its last T keys.
    b_qpos = tl.maximum(n - T + i_t, 0)
    b_lq = _rotated(b_q, p_q, b_qpos, m_r, cos, sin, stride_cn, D).to(dot_ty)
    per_split = tl.cdiv(tl.cdiv(n, BN), NSPLIT) * BN
    lo = i_s * per_split
    hi = tl.minimum(lo + per_split, tl.max(tl.where(m_r, b_qpos, 0)) + 1)  # causal: no key past
    # Blocks before the tile's first query position are seen whole by every row: no mask.
    seen_by_all = (tl.min(tl.where(m_r, b_qpos, n)) + 1) // BN * BN
    for i_k in range(lo, tl.minimum(hi, seen_by_all), BN):
        o_k = i_k + tl.arange(0, BN)
        p_k = local_k + i_b * stride_lb + i_h * stride_lh + o_k * stride_lk
        p_v = local_v + i_b * stride_lb + i_h * stride_lh + o_k * stride_lk
        b_m, b_l, b_acc = _attend_block(
            b_lq, p_k, p_v, o_k < n, o_k, m_r[:, None], cos, sin, stride_cn,
            b_m, b_l, b_acc, qk_scale, D, ROTATE_LOCAL, EXACT, False,
        )  # fmt: skip
    for i_k in range(tl.maximum(lo, seen_by_all), hi, BN):  # the causal edge
        o_k = i_k + tl.arange(0, BN)
        m_k = o_k < n
        p_k = local_k + i_b * stride_lb + i_h * stride_lh + o_k * stride_lk
        p_v = local_v + i_b * stride_lb + i_h * stride_lh + o_k * stride_lk
        m_vis = (o_k[None, :] <= b_qpos[:, None]) & m_r[:, None]
        b_m, b_l, b_acc = _attend_block(
            b_lq, p_k, p_v, m_k, o_k, m_vis, cos, sin, stride_cn,
            b_m, b_l, b_acc, qk_scale, D, ROTATE_LOCAL, EXACT, True,
        )  # fmt: skip

    _store_rows(acc_out, m_out, l_out, (i_s * tl.num_programs(0) + i_bh) * ROWS + o_r, m_r,
                b_acc, b_m, b_l, D, NSPLIT == 1)  # fmt: skip


@triton.jit
def _store_rows(acc_out, m_out, l_out, o_out, m_r, b_acc, b_m, b_l, D: tl.constexpr,
                FINAL: tl.constexpr):  # fmt: skip
    """FINAL: the normalised output and lse (natural log; rows that saw nothing: 0 and -inf).
    Otherwise this split's partials (accumulator, base-2 max, sum) for `merge_splits_kernel`."""
    o_d = tl.arange(0, D)
    if FINAL:
        b_seen = b_l > 0
        b_out = b_acc / tl.where(b_seen, b_l, 1.0)[:, None]
        b_lse = tl.where(b_seen, (b_m + tl.log2(tl.where(b_seen, b_l, 1.0))) / LOG2E_C,
                         float("-inf"))  # fmt: skip
        tl.store(acc_out + o_out[:, None] * D + o_d[None, :], b_out, mask=m_r[:, None])
        tl.store(m_out + o_out, b_lse, mask=m_r)
    else:
        tl.store(acc_out + o_out[:, None] * D + o_d[None, :], b_acc, mask=m_r[:, None])
        tl.store(m_out + o_out, b_m, mask=m_r)
        tl.store(l_out + o_out, b_l, mask=m_r)


@triton.jit
def merge_splits_kernel(acc, maxes, sums, out, lse, N_ROWS, D: tl.constexpr, NSPLIT: tl.constexpr,
                        BR: tl.constexpr):  # fmt: skip
    """Exact merge of split-K partials [NSPLIT, N_ROWS(, D)] into out [N_ROWS, D], lse."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < N_ROWS
    o_d = tl.arange(0, D)
    b_m = tl.full([BR], float("-inf"), tl.float32)
    for i_s in tl.static_range(NSPLIT):
        b_m = tl.maximum(b_m, tl.load(maxes + i_s * N_ROWS + o_r, mask=m_r, other=float("-inf")))
    b_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_l = tl.zeros([BR], tl.float32)
    b_acc = tl.zeros([BR, D], tl.float32)
    for i_s in tl.static_range(NSPLIT):
        b_w = tl.exp2(tl.load(maxes + i_s * N_ROWS + o_r, mask=m_r, other=float("-inf")) - b_safe)
        b_l += b_w * tl.load(sums + i_s * N_ROWS + o_r, mask=m_r, other=0.0)
        p_acc = acc + (i_s * N_ROWS + o_r)[:, None] * D + o_d[None, :]
        b_acc += b_w[:, None] * tl.load(p_acc, mask=m_r[:, None], other=0.0)
    _store_rows(out, lse, lse, o_r, m_r, b_acc, b_safe, b_l, D, True)


def _launch_config(rows: int, head_dim: int, rotates: bool = False, element_size: int = 2) -> dict:
    """Block sizes by rows (decode: few), head size and whether keys are rotated in the kernel
    (their cos/sin rows take shared memory too). fp32 tiles take twice the registers and shared
    memory of bf16 ones, so they are sized as a head twice as wide."""
    width = head_dim * element_size // 2
    if width > 256:  # fp32 at head 256 (Gemma 3): small tiles, or the registers spill
        return dict(BM=16 if rows <= 16 else 32, BN=32, num_warps=4, num_stages=1)
    if rotates and rows > 16 and width >= 128:
        return dict(BM=64, BN=32, num_warps=4, num_stages=1)
    # Measured on an H100 (bf16, a 4096-key window): see benchmarks/RESULTS.md.
    if rows <= 16:
        return dict(BM=16, BN=32 if width <= 64 else 64, num_warps=2, num_stages=2)
    if width <= 64:
        return dict(BM=128, BN=64, num_warps=4, num_stages=3)
    if width <= 128:
        return dict(BM=64, BN=64, num_warps=4, num_stages=3)
    return dict(BM=64, BN=32, num_warps=4, num_stages=1)


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
    """Same signature and results as `reference.memory_attention`; the local keys' mass is a
    second pass from the lse (`local_key_mass`, on the backend the dispatcher picks for it)."""
    keys, count = local_k, n_local  # as given, for the mass pass
    batch, n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, capacity = local_k.shape[1], local_k.shape[2]
    group = n_q_heads // n_kv_heads
    if (reason := supports(q)) is not None:
        raise ValueError(f"the Triton kernel cannot run this: {reason}")
    if n_q_heads % n_kv_heads or local_k.shape[0] != batch or local_k.shape != local_v.shape:
        raise ValueError(f"q {tuple(q.shape)} and local k/v {tuple(local_k.shape)} do not match")
    n_sinks = 0 if sink_k is None else sink_k.shape[2]
    n_unit_keys = 0 if ids is None else ids.shape[-1] * unit_size
    on_device = isinstance(n_local, torch.Tensor)
    q, local_k, local_v = (_last_dim_dense(x) for x in (q, local_k, local_v))
    if n_sinks:
        sink_k, sink_v = _last_dim_dense(sink_k), _last_dim_dense(sink_v)
    else:
        sink_k, sink_v = local_k, local_v  # never read
    if n_unit_keys:
        pool_k, pool_v = _last_dim_dense(pool_k), _last_dim_dense(pool_v)
    else:
        pool_k, pool_v = local_k, local_v  # never read
        ids = torch.empty(1, 1, 1, dtype=torch.int32, device=q.device)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # no copy if already so
    ids = ids if ids.stride(-1) == 1 else ids.contiguous()

    rows = group * n_queries
    n_keys = n_sinks + n_unit_keys + capacity
    n_rows = batch * n_kv_heads * rows

    def launch(config: dict) -> tuple[torch.Tensor, torch.Tensor]:
        row_tiles = triton.cdiv(rows, config["BM"])
        # Decode has few rows: split the window so that every multiprocessor gets work.
        splits = 1 if row_tiles > 1 else max(1, min(32, n_keys // (4 * config["BN"])))
        out = triton_attention._alloc((n_rows, head_dim), q.device, out_dtype)
        lse = triton_attention._alloc((n_rows,), q.device)
        if splits == 1:  # the kernel writes the result itself
            acc, m, l = out, lse, lse  # noqa: E741
        else:
            acc = triton_attention._alloc((splits, n_rows, head_dim), q.device)
            m, l = (triton_attention._alloc((splits, n_rows), q.device) for _ in range(2))  # noqa: E741
        memory_attention_fwd_kernel[(batch * n_kv_heads, row_tiles, splits)](
            q, sink_k, sink_v, pool_k, pool_v, ids, local_k, local_v, n_local, cos, sin,
            acc, m, l,
            scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            sink_k.stride(0), sink_k.stride(1), sink_k.stride(2),
            pool_k.stride(0), pool_k.stride(1), pool_k.stride(2),
            ids.stride(0), ids.stride(1),  # ids rows are read densely (made so above)
            local_k.stride(0), local_k.stride(1), local_k.stride(2),
            cos.stride(0),
            n_queries, n_kv_heads, rows, n_sinks, n_unit_keys, memory_q_pos,
            G=group, D=head_dim, U=unit_size, NSPLIT=splits, STACKED=stacked,
            ROTATE_LOCAL=not local_rotated, EXACT=q.dtype == torch.float32,
            N_ON_DEVICE=on_device,
            EVEN_MEMORY=n_sinks % config["BN"] == 0 and n_unit_keys % config["BN"] == 0,
            **config,
        )  # fmt: skip
        if splits > 1:
            merge_splits_kernel[(triton.cdiv(n_rows, 16),)](
                acc, m, l, out, lse, n_rows, D=head_dim, NSPLIT=splits, BR=16, num_warps=4
            )
        return out, lse

    rotates = stacked or not local_rotated
    out, lse = launch_fitted(
        "memory_attention",
        launch,
        _launch_config(rows, head_dim, rotates=rotates, element_size=q.element_size()),
        key=(q.device, q.dtype, head_dim, rotates),
    )
    # rows are (g, t) per key head: [B, Hq, T, D] without a copy
    out = out.view(batch, n_kv_heads, group, n_queries, head_dim).view(q.shape)
    lse = lse.view(batch, n_q_heads, n_queries)
    if not with_local_mass:
        return out, lse, None
    from agentmem_kernels import local_key_mass as dispatched

    mass = dispatched(
        q, keys, n_local=count, lse=lse, cos=cos, sin=sin, scale=scale,
        local_rotated=local_rotated,
    )  # fmt: skip
    return out, lse, mass


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# Query rows (heads of a group x queries) up to which `unit_mass` keeps its logits between the
# passes: writing and reading 4 bytes a row and unit costs less than the second pass's products
# over R representatives of D values each. A decoding step scores with its query window (32
# queries x 4 to 8 heads a group), a prefill chunk with over a thousand: those compute again,
# as keeping their logits would take gigabytes at a million tokens.
KEEP_LOGITS_MAX_ROWS = 256


@triton.jit
def unit_mass_kernel(
    q, reps, n_valid, stats_m, stats_l, lse, logits, mass,
    scale,
    stride_qb, stride_qh, stride_qt,
    stride_rb, stride_rh, stride_rn,
    T, HKV, ROWS, NCAP, N_STATS,
    G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PASS: tl.constexpr, MINMAX: tl.constexpr, KEEP: tl.constexpr, COMBINE: tl.constexpr,
    EXACT: tl.constexpr,
    N_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    """PASS 1: per-row max and sum of exp of this block's unit logits (and, KEEP, the logits).
    PASS 2: each unit's mass, sum over rows of exp(logit - lse of the row): the logits read back
    (KEEP) or computed again; each row's lse combined here (COMBINE) from N_STATS statistics
    (pass 1's, or `unit_lse_kernel`'s partial ones), or read.
    PASS 0: one block holds every unit: each row's softmax and the mass at once."""
    i_bh, i_n = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < _count(n_valid, N_ON_DEVICE)
    o_d = tl.arange(0, D)
    n_blocks = tl.num_programs(1)
    b_mass = tl.zeros([BN], tl.float32)
    # Blocks past the last unit (a pool's spare capacity) compute nothing.
    rows = tl.where(i_n * BN < _count(n_valid, N_ON_DEVICE), ROWS, 0)
    if PASS == 1:
        for i_r in range(rows, ROWS, BM):  # their statistics: no mass anywhere
            o_r = i_r + tl.arange(0, BM)
            p_stats = (i_bh * n_blocks + i_n) * ROWS + o_r
            tl.store(stats_m + p_stats, tl.full([BM], float("-inf"), tl.float32), mask=o_r < ROWS)
            tl.store(stats_l + p_stats, tl.zeros([BM], tl.float32), mask=o_r < ROWS)
    for i_r in range(0, rows, BM):
        o_r = i_r + tl.arange(0, BM)
        m_r = o_r < ROWS
        i_g, i_t = o_r // T, o_r % T
        m_rn = m_r[:, None] & m_n[None, :]
        p_logits = logits + (i_bh * ROWS + o_r[:, None]) * NCAP + o_n[None, :]
        if PASS == 2 and KEEP:
            b_s = tl.load(p_logits, mask=m_rn, other=float("-inf"))
        else:
            p_q = q + i_b * stride_qb + (i_h * G + i_g)[:, None] * stride_qh
            b_q = tl.load(
                p_q + i_t[:, None] * stride_qt + o_d[None, :], mask=m_r[:, None], other=0.0
            )
            b_s = tl.full([BM, BN], float("-inf"), tl.float32)
            p_rep = (
                reps + i_b * stride_rb + i_h * stride_rh + o_n[:, None] * stride_rn + o_d[None, :]
            )
            for i_rep in tl.static_range(R):
                if MINMAX:  # bounding boxes: R mins then R maxes
                    b_lo = tl.load(p_rep + i_rep * D, mask=m_n[:, None], other=0.0)
                    b_hi = tl.load(p_rep + (R + i_rep) * D, mask=m_n[:, None], other=0.0)
                    b_qp = tl.maximum(b_q, 0.0).to(b_q.dtype)
                    b_qn = tl.minimum(b_q, 0.0).to(b_q.dtype)
                    if EXACT:
                        b_x = tl.dot(b_qp, tl.trans(b_hi), input_precision=FP32_DOT)
                        b_x += tl.dot(b_qn, tl.trans(b_lo), input_precision=FP32_DOT)
                    else:
                        b_x = tl.dot(b_qp, tl.trans(b_hi)) + tl.dot(b_qn, tl.trans(b_lo))
                else:
                    b_rep = tl.load(p_rep + i_rep * D, mask=m_n[:, None], other=0.0)
                    if EXACT:
                        b_x = tl.dot(b_q, tl.trans(b_rep), input_precision=FP32_DOT)
                    else:
                        b_x = tl.dot(b_q, tl.trans(b_rep))
                b_s = tl.maximum(b_s, b_x)
            b_s = tl.where(m_rn, b_s * scale, float("-inf"))
        p_stats = (i_bh * n_blocks + i_n) * ROWS + o_r
        if PASS == 0:
            b_max = tl.max(b_s, 1)
            b_p = tl.exp(b_s - tl.where(b_max == float("-inf"), 0.0, b_max)[:, None])
            b_sum = tl.sum(b_p, 1)
            b_mass += tl.sum(b_p / tl.where(b_sum > 0, b_sum, 1.0)[:, None], 0)
        elif PASS == 1:
            b_max = tl.max(b_s, 1)
            b_safe = tl.where(b_max == float("-inf"), 0.0, b_max)
            tl.store(stats_m + p_stats, b_max, mask=m_r)
            tl.store(stats_l + p_stats, tl.sum(tl.exp(b_s - b_safe[:, None]), 1), mask=m_r)
            if KEEP:
                tl.store(p_logits, b_s, mask=m_r[:, None] & (o_n[None, :] < NCAP))
        else:
            if COMBINE:  # each program combines the rows' statistics itself
                b_lse = _combined_lse(stats_m, stats_l, i_bh, N_STATS, ROWS, o_r, m_r, BM)
                b_lse = tl.where(m_r, b_lse, float("inf"))
            else:
                b_lse = tl.load(lse + i_bh * ROWS + o_r, mask=m_r, other=float("inf"))
            b_mass += tl.sum(tl.exp(b_s - b_lse[:, None]), 0)
    if PASS != 1:
        tl.store(mass + i_bh * NCAP + o_n, tl.where(m_n, b_mass, -1.0), mask=o_n < NCAP)


@triton.jit
def _block_stats(stats_m, stats_l, i_bh, n_blocks, lo, hi, ROWS, o_r, m_r, BLOCK: tl.constexpr):
    """Rows `o_r`'s maximum and sum of exp (relative to it) over blocks [lo, hi) of the
    [B * Hkv, n_blocks, ROWS] statistics, read 16 blocks at a time and combined online (a block
    at a time was a chain of dependent loads: 29 us at 256 blocks on an H200, 11 us so)."""
    o_blk = tl.arange(0, 16)
    b_top = tl.full([BLOCK], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK], tl.float32)
    for first in range(lo, hi, 16):
        m_blk = (first + o_blk < hi)[:, None] & m_r[None, :]
        p_blk = (i_bh * n_blocks + first + o_blk)[:, None] * ROWS + o_r[None, :]
        b_blk_m = tl.load(stats_m + p_blk, mask=m_blk, other=float("-inf"))
        b_blk_l = tl.load(stats_l + p_blk, mask=m_blk, other=0.0)
        b_new = tl.maximum(b_top, tl.max(b_blk_m, 0))
        b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_sum = b_sum * tl.exp(b_top - b_safe) + tl.sum(
            b_blk_l * tl.exp(b_blk_m - b_safe[None, :]), 0
        )
        b_top = b_new
    return b_top, b_sum


@triton.jit
def _combined_lse(stats_m, stats_l, i_bh, n_blocks, ROWS, o_r, m_r, BLOCK: tl.constexpr):
    """Rows `o_r`'s log-sum-exp over every unit, from each block's maximum and sum."""
    b_top, b_sum = _block_stats(
        stats_m, stats_l, i_bh, n_blocks, 0, n_blocks, ROWS, o_r, m_r, BLOCK
    )
    b_safe = tl.where(b_top == float("-inf"), 0.0, b_top)
    return b_safe + tl.log(tl.where(m_r, b_sum, 1.0))


@triton.jit
def unit_lse_kernel(
    stats_m, stats_l, out_m, out_l, ROWS, N_BLOCKS, PER_SPLIT,
    BR: tl.constexpr, PARTIAL: tl.constexpr,
):  # fmt: skip
    """Each row's log-sum-exp, once for every program of the second pass; PARTIAL, each program
    (a third grid axis) combines PER_SPLIT blocks only and writes their maximum and sum, which
    the second pass combines (many blocks: 511 at 16K units, one chain per row was 22 us)."""
    i_bh, i_r, i_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < ROWS
    lo = i_split * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, N_BLOCKS)
    b_top, b_sum = _block_stats(stats_m, stats_l, i_bh, N_BLOCKS, lo, hi, ROWS, o_r, m_r, BR)
    if PARTIAL:
        p_out = (i_bh * tl.num_programs(2) + i_split) * ROWS + o_r
        tl.store(out_m + p_out, b_top, mask=m_r)
        tl.store(out_l + p_out, b_sum, mask=m_r)
    else:
        b_safe = tl.where(b_top == float("-inf"), 0.0, b_top)
        tl.store(out_m + i_bh * ROWS + o_r, b_safe + tl.log(tl.where(m_r, b_sum, 1.0)), mask=m_r)


# Blocks of units whose statistics one program of `unit_lse_kernel` combines, beyond which the
# combining is split over several programs a row (at most LSE_MAX_SPLITS), then finished by
# each program of the second pass.
LSE_BLOCKS_PER_SPLIT = 32
LSE_MAX_SPLITS = 32


def unit_mass(
    q: torch.Tensor,
    reps: torch.Tensor,
    *,
    kind: str,
    scale: float,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same signature and results as `reference.unit_mass`: two passes over the representatives
    (softmax statistics, then mass), or one where a block holds every unit; with at most
    `KEEP_LOGITS_MAX_ROWS` query rows (a decoding step's query window) the first pass keeps the
    logits, so the second neither reads the representatives again nor repeats their products."""
    if kind not in ("dot", "minmax"):
        raise ValueError(f"unknown unit score kind '{kind}'; expected 'dot' or 'minmax'")
    batch, n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, capacity, n_slots = reps.shape[1], reps.shape[2], reps.shape[3]
    group = n_q_heads // n_kv_heads
    if (reason := supports(q)) is not None:
        raise ValueError(f"the Triton kernel cannot run this: {reason}")
    on_device = n_valid is not None
    n_valid = capacity if n_valid is None else n_valid
    q = _last_dim_dense(q)
    if reps.stride(-1) != 1 or reps.stride(-2) != head_dim:
        reps = reps.contiguous()
    rows = group * n_queries
    width = head_dim * q.element_size() // 2  # fp32 tiles weigh as a head twice as wide
    # With few rows each program of the second pass combines their statistics itself; with more,
    # a launch of its own does it once (at 128 rows on an H200, 4.8 us for both against 5.6 for
    # a combining pass 2, from 2 blocks to 15).
    keep, combine = rows <= KEEP_LOGITS_MAX_ROWS, rows <= 16
    r = n_slots // 2 if kind == "minmax" else n_slots
    preferred = {
        "BM": 16 if rows <= 16 else 32 if width > 256 else 64,
        "BN": 64 if width <= 128 else 32,
        "num_warps": 4,
        "num_stages": 3 if head_dim <= 64 else 2 if head_dim <= 128 else 1,
    }
    if keep and width <= 128 and rows > 16:
        # A decoding step at head size 64 or 128 (Llama: 128 rows a key head): all its rows in one
        # block read each representative once. On an H200 at head size 64, pass 1 took 82 us
        # rather than 134 at 16K units, 11 rather than 20 at 2K; at 128, all three kernels 12
        # us rather than 20 at 480 units. Up to 64 units one block of 64 holds them all: one pass
        # (6 us rather than 9 at 42 units).
        preferred = {
            "BM": min(128, triton.next_power_of_2(rows)),
            "BN": 64 if capacity <= 64 else 32,
            "num_warps": 8,
            "num_stages": 2,
        }

    def both_passes(config: dict) -> torch.Tensor:
        block_n = config["BN"]
        n_blocks = triton.cdiv(capacity, block_n)
        stats_m = triton_attention._alloc((batch * n_kv_heads, n_blocks, rows), q.device)
        stats_l = triton_attention._alloc((batch * n_kv_heads, n_blocks, rows), q.device)
        logits = triton_attention._alloc(
            (batch * n_kv_heads, rows, capacity) if keep else (1,), q.device
        )
        mass = triton_attention._alloc((batch * n_kv_heads, capacity), q.device)

        def launch(pass_, lse, stats=(stats_m, stats_l), n_stats=n_blocks, combining=combine):
            unit_mass_kernel[(batch * n_kv_heads, n_blocks)](
                q, reps, n_valid, *stats, lse, logits, mass,
                scale,
                q.stride(0), q.stride(1), q.stride(2),
                reps.stride(0), reps.stride(1), reps.stride(2),
                n_queries, n_kv_heads, rows, capacity, n_stats,
                G=group, D=head_dim, R=r, BM=config["BM"], BN=block_n,
                PASS=pass_, MINMAX=kind == "minmax", KEEP=keep, COMBINE=combining,
                EXACT=q.dtype == torch.float32,
                N_ON_DEVICE=on_device,
                num_warps=config["num_warps"], num_stages=config["num_stages"],
            )  # fmt: skip

        if n_blocks == 1:  # every unit in one block: one pass
            launch(0, stats_m)
            return mass.view(batch, n_kv_heads, capacity)
        launch(1, stats_m)  # lse is not read in pass 1; a refused launch is refused here
        if combine:
            launch(2, stats_m)  # lse combined inside
            return mass.view(batch, n_kv_heads, capacity)
        n_splits = min(LSE_MAX_SPLITS, triton.cdiv(n_blocks, LSE_BLOCKS_PER_SPLIT))
        per_split = triton.cdiv(n_blocks, n_splits)
        grid = (batch * n_kv_heads, triton.cdiv(rows, 32), n_splits)
        partial = n_splits > 1  # then the splits' maxima and sums, else each row's lse
        out = [triton_attention._alloc((grid[0], n_splits, rows), q.device) for _ in "ml"]
        unit_lse_kernel[grid](
            stats_m, stats_l, *out, rows, n_blocks, per_split, BR=32, PARTIAL=partial,
            num_warps=2,
        )  # fmt: skip
        if partial:
            launch(2, stats_m, stats=out, n_stats=n_splits, combining=True)
        else:
            launch(2, out[0])
        return mass.view(batch, n_kv_heads, capacity)

    # Many representatives a unit (repr_topk 16 at head size 64) once asked an H200 for 418 KB
    # of shared memory at three stages: the launch steps down until it fits.
    key = (q.device.index, q.dtype, head_dim, r, kind, keep, combine)
    return launch_fitted("unit_mass", both_passes, preferred, key)


@triton.jit
def local_key_mass_kernel(
    q, local_k, n_local, lse, cos, sin, mass,
    qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_lb, stride_lh, stride_lk,
    stride_mb, stride_mh,
    stride_cn,
    T, HKV, ROWS, CAPACITY,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EXACT: tl.constexpr,
    N_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    """Each program owns a block of local keys (stored rotated) and sums, over every row of its
    key head, the probability the row gave each key: exp(logit - lse of the row)."""
    i_bh, i_n = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    n = _count(n_local, N_ON_DEVICE)
    o_k = i_n * BN + tl.arange(0, BN)
    m_k = o_k < n
    o_d = tl.arange(0, D)
    p_k = local_k + i_b * stride_lb + i_h * stride_lh + o_k * stride_lk
    b_k = tl.load(p_k[:, None] + o_d[None, :], mask=m_k[:, None], other=0.0)
    b_mass = tl.zeros([BN], tl.float32)
    for i_r in range(0, ROWS, BM):
        o_r = i_r + tl.arange(0, BM)
        m_r = o_r < ROWS
        i_g, i_t = o_r // T, o_r % T
        b_qpos = tl.maximum(n - T + i_t, 0)
        p_q = q + i_b * stride_qb + (i_h * G + i_g) * stride_qh + i_t * stride_qt
        b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_r[:, None], other=0.0)
        b_q = _rotated(b_q, p_q, b_qpos, m_r, cos, sin, stride_cn, D).to(b_k.dtype)
        if EXACT:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=FP32_DOT)
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        b_lse = tl.load(lse + i_bh * ROWS + o_r, mask=m_r, other=float("inf"))
        m_vis = m_r[:, None] & m_k[None, :] & (o_k[None, :] <= b_qpos[:, None])
        b_p = tl.exp2(b_s * qk_scale - b_lse[:, None] * LOG2E_C)
        b_mass += tl.sum(tl.where(m_vis, b_p, 0.0), 0)
    tl.store(mass + i_b * stride_mb + i_h * stride_mh + o_k, b_mass, mask=o_k < CAPACITY)


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
    """Same signature and results as `reference.local_key_mass`."""
    batch, n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, capacity = local_k.shape[1], local_k.shape[2]
    if (reason := supports(q)) is not None:
        raise ValueError(f"the Triton kernel cannot run this: {reason}")
    on_device = isinstance(n_local, torch.Tensor)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # no copy if already so
    if not local_rotated:
        local_k = reference.rope(local_k.float(), cos[:capacity], sin[:capacity]).to(local_k.dtype)
    q, local_k = _last_dim_dense(q), _last_dim_dense(local_k)
    rows = (n_q_heads // n_kv_heads) * n_queries
    mass = torch.empty(batch, n_kv_heads, capacity, dtype=torch.float32, device=q.device)
    # Rows are rotated in the loop (fp32 cos/sin tiles): small tiles, shallow pipelines for large
    # heads, or the shared memory runs out (Gemma's 256).
    block_n = 64 if head_dim <= 128 else 32
    block_m = 16 if rows <= 16 or head_dim > 128 else 64
    stages = 2 if head_dim <= 128 else 1
    local_key_mass_kernel[(batch * n_kv_heads, triton.cdiv(capacity, block_n))](
        q, local_k, n_local, lse.contiguous(), cos, sin, mass,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        local_k.stride(0), local_k.stride(1), local_k.stride(2),
        mass.stride(0), mass.stride(1),
        cos.stride(0),
        n_queries, n_kv_heads, rows, capacity,
        G=n_q_heads // n_kv_heads, D=head_dim, BM=block_m, BN=block_n,
        EXACT=q.dtype == torch.float32, N_ON_DEVICE=on_device, num_warps=4, num_stages=stages,
    )  # fmt: skip
    return mass


@triton.jit
def copy_units_kernel(
    src_k, src_v, ids, dst_k, dst_v, slots,
    stride_sb, stride_sh, stride_db, stride_dh, stride_ib, stride_ih,
    HKV, UNIT_NUMEL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Each program copies one unit (unit_size x D contiguous values) of keys and values, or
    nothing where its slot is -1. Either side may be pinned host memory, reached through UVA."""
    i_bh, i_j = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    slot = tl.load(slots + i_b * stride_ib + i_h * stride_ih + i_j).to(tl.int64)
    unit = tl.load(ids + i_b * stride_ib + i_h * stride_ih + i_j).to(tl.int64)
    src = i_b.to(tl.int64) * stride_sb + i_h.to(tl.int64) * stride_sh + unit * UNIT_NUMEL
    dst = i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh + slot * UNIT_NUMEL
    limit = tl.where(slot >= 0, UNIT_NUMEL, 0)  # a -1 slot copies nothing
    for first in range(0, UNIT_NUMEL, BLOCK):
        offsets = first + tl.arange(0, BLOCK)
        mask = offsets < limit
        tl.store(dst_k + dst + offsets, tl.load(src_k + src + offsets, mask=mask), mask=mask)
        tl.store(dst_v + dst + offsets, tl.load(src_v + src + offsets, mask=mask), mask=mask)


def copy_units(
    src_k: torch.Tensor, src_v: torch.Tensor, ids: torch.Tensor,
    dst_k: torch.Tensor, dst_v: torch.Tensor, slots: torch.Tensor, unit_size: int,
) -> None:  # fmt: skip
    """Same signature and effect as `reference.copy_units`, without reading anything back (a
    graph captures it). A side in host memory must be pinned: the kernel reaches it in place."""
    batch, n_kv_heads, k = slots.shape
    head_dim = dst_k.shape[-1]
    for name, x in (("src_k", src_k), ("src_v", src_v), ("dst_k", dst_k), ("dst_v", dst_v)):
        if x.stride(-1) != 1 or x.stride(-2) != head_dim:
            raise ValueError(f"copy_units needs {name}'s rows dense, got strides {x.stride()}")
        if x.dtype != dst_k.dtype:
            raise ValueError(f"copy_units copies within one dtype: {name} is {x.dtype}")
        if x.device.type == "cpu" and slots.is_cuda and not x.is_pinned():
            raise ValueError(f"copy_units reaches host memory in place: pin {name}")
    if src_k.stride()[:2] != src_v.stride()[:2] or dst_k.stride()[:2] != dst_v.stride()[:2]:
        raise ValueError("copy_units needs keys and values of one layout")
    ids, slots = ids.contiguous(), slots.contiguous()
    if ids.shape != slots.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and slots {tuple(slots.shape)} differ")
    if k == 0:
        return
    unit_numel = unit_size * head_dim
    copy_units_kernel[(batch * n_kv_heads, k)](
        src_k, src_v, ids, dst_k, dst_v, slots,
        src_k.stride(0), src_k.stride(1), dst_k.stride(0), dst_k.stride(1),
        slots.stride(0), slots.stride(1),
        n_kv_heads, UNIT_NUMEL=unit_numel, BLOCK=min(2048, triton.next_power_of_2(unit_numel)),
        num_warps=4,
    )  # fmt: skip


@triton.jit
def fetch_units_kernel(
    ids, slot_of, unit_of, last_used, counters, out_slots, out_copy,
    K, P, stride_s, stride_u,
    BK: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """One program per (batch row, head): the row's lookups, its least recently used slots
    chosen by K rounds of argmin, then the table writes (after a barrier: every read first)."""
    row = tl.program_id(0).to(tl.int64)
    o_k, o_p = tl.arange(0, BK), tl.arange(0, BP)
    m_k, m_p = o_k < K, o_p < P
    p_slot_of, p_unit_of = slot_of + row * stride_s, unit_of + row * stride_u
    p_used = last_used + row * stride_u
    units = tl.load(ids + row * K + o_k, mask=m_k, other=0).to(tl.int64)
    slots = tl.load(p_slot_of + units, mask=m_k, other=-1)
    hit, miss = m_k & (slots >= 0), m_k & (slots < 0)
    now = tl.load(p_used + P) + 1
    used = tl.load(p_used + o_p, mask=m_p, other=0)
    hit_slot = tl.sum(((slots[:, None] == o_p[None, :]) & hit[:, None]).to(tl.int32), 0) > 0
    used = tl.where(hit_slot, now, used)
    age = tl.where(m_p, used * (P + 1) + o_p, 9223372036854775807)
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    victim = tl.zeros([BK], tl.int64)
    n_miss = tl.sum(miss.to(tl.int32), 0)
    for r in range(0, n_miss):
        oldest = tl.argmin(age, 0)
        victim = tl.where(rank == r, oldest, victim)
        age = tl.where(o_p == oldest, 9223372036854775807, age)
    evicted = tl.load(p_unit_of + victim, mask=miss, other=-1)
    tl.debug_barrier()
    tl.store(p_slot_of + evicted, tl.full([BK], -1, tl.int64), mask=miss & (evicted >= 0))
    tl.store(p_slot_of + units, victim, mask=miss)
    tl.store(p_unit_of + victim, units, mask=miss)
    tl.store(p_used + victim, tl.zeros([BK], tl.int64) + now, mask=miss)
    tl.store(p_used + slots, tl.zeros([BK], tl.int64) + now, mask=hit)
    tl.store(p_used + P, now)
    tl.store(out_slots + row * K + o_k, tl.where(hit, slots, victim), mask=m_k)
    tl.store(out_copy + row * K + o_k, tl.where(miss, victim, -1), mask=m_k)
    tl.atomic_add(counters, tl.sum(hit.to(tl.int64), 0))
    tl.atomic_add(counters + 1, tl.sum(m_k.to(tl.int64), 0))


def fetch_units(
    ids: torch.Tensor, slot_of: torch.Tensor, unit_of: torch.Tensor, last_used: torch.Tensor,
    counters: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Same signature, effect and results as `reference.fetch_units`, in one launch."""
    batch, heads, k = ids.shape
    n_slots = unit_of.shape[2] - 1
    for name, table in (("slot_of", slot_of), ("unit_of", unit_of), ("last_used", last_used)):
        dense_rows = table.stride(2) == 1 and table.stride(0) == heads * table.stride(1)
        if table.dtype != torch.int64 or not dense_rows:
            raise ValueError(f"fetch_units needs {name} int64 with rows of one stride")
    if last_used.stride() != unit_of.stride():
        raise ValueError("fetch_units needs unit_of and last_used of one layout")
    ids = ids.contiguous()
    slots, copy = torch.empty_like(ids, dtype=torch.int64), torch.empty_like(ids, dtype=torch.int64)
    if k == 0:
        return slots, copy
    block_p = triton.next_power_of_2(n_slots)
    fetch_units_kernel[(batch * heads,)](
        ids, slot_of, unit_of, last_used, counters, slots, copy,
        k, n_slots, slot_of.stride(1), unit_of.stride(1),
        BK=triton.next_power_of_2(k), BP=block_p, num_warps=1 if block_p <= 256 else 4,
    )  # fmt: skip
    return slots, copy


@triton.jit
def _rotate_rows(
    x, p_x, dst, p_dst, m_rows, cos, sin, position, HALF: tl.constexpr,
    ALSO_PLAIN: tl.constexpr, plain, p_plain,
):  # fmt: skip
    """Rows of x (pointers p_x [R] + 0..D-1) rotated to `position` in fp32 into dst, and (if
    ALSO_PLAIN) copied as they are into plain: half-split RoPE, as transformers' rotate_half."""
    o_h = tl.arange(0, HALF)
    lo = tl.load(x + p_x[:, None] + o_h[None, :], mask=m_rows[:, None], other=0.0)
    hi = tl.load(x + p_x[:, None] + HALF + o_h[None, :], mask=m_rows[:, None], other=0.0)
    c_lo, c_hi = tl.load(cos + position + o_h), tl.load(cos + position + HALF + o_h)
    s_lo, s_hi = tl.load(sin + position + o_h), tl.load(sin + position + HALF + o_h)
    f_lo, f_hi = lo.to(tl.float32), hi.to(tl.float32)
    out_lo = f_lo * c_lo[None, :] - f_hi * s_lo[None, :]
    out_hi = f_hi * c_hi[None, :] + f_lo * s_hi[None, :]
    tl.store(dst + p_dst[:, None] + o_h[None, :], out_lo, mask=m_rows[:, None])
    tl.store(dst + p_dst[:, None] + HALF + o_h[None, :], out_hi, mask=m_rows[:, None])
    if ALSO_PLAIN:
        tl.store(plain + p_plain[:, None] + o_h[None, :], lo, mask=m_rows[:, None])
        tl.store(plain + p_plain[:, None] + HALF + o_h[None, :], hi, mask=m_rows[:, None])


@triton.jit
def append_token_kernel(
    k, v, q, local_k, local_v, local_mass, local_rot, queries, counts, cos, sin,
    stride_kb, stride_kh, stride_vb, stride_vh, stride_qb, stride_qh,
    stride_lb, stride_lh, stride_lt, stride_mb, stride_mh, stride_rb, stride_rh, stride_rt,
    stride_c, HKV, HQ, N_KV, N_Q, QUERY_POSITION, RING,
    HALF: tl.constexpr, BKV: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    """One program: every row's writes, then the counts (read first, written last)."""
    slot = tl.load(counts).to(tl.int64)
    ring = tl.load(counts + 2).to(tl.int64)
    r_kv = tl.arange(0, BKV)
    m_kv = r_kv < N_KV
    b_kv, h_kv = (r_kv // HKV).to(tl.int64), (r_kv % HKV).to(tl.int64)
    p_local = b_kv * stride_lb + h_kv * stride_lh + slot * stride_lt
    _rotate_rows(k, b_kv * stride_kb + h_kv * stride_kh, local_rot, p_local, m_kv, cos, sin,
                 slot * stride_c, HALF, True, local_k, p_local)  # fmt: skip
    o_d = tl.arange(0, 2 * HALF)
    p_v = v + (b_kv * stride_vb + h_kv * stride_vh)[:, None] + o_d[None, :]
    tl.store(local_v + p_local[:, None] + o_d[None, :], tl.load(p_v, mask=m_kv[:, None]),
             mask=m_kv[:, None])  # fmt: skip
    tl.store(local_mass + b_kv * stride_mb + h_kv * stride_mh + slot,
             tl.zeros([BKV], tl.float32), mask=m_kv)  # fmt: skip
    r_q = tl.arange(0, BQ)
    m_q = r_q < N_Q
    b_q, h_q = (r_q // HQ).to(tl.int64), (r_q % HQ).to(tl.int64)
    _rotate_rows(q, b_q * stride_qb + h_q * stride_qh, queries,
                 b_q * stride_rb + h_q * stride_rh + ring * stride_rt, m_q, cos, sin,
                 QUERY_POSITION * stride_c, HALF, False, queries, r_q)  # fmt: skip
    tl.debug_barrier()
    tl.store(counts, (slot + 1).to(tl.int32))
    tl.store(counts + 2, ((ring + 1) % RING).to(tl.int32))


def append_token(
    k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, *,
    local_k: torch.Tensor, local_v: torch.Tensor, local_mass: torch.Tensor,
    local_rotated: torch.Tensor, queries: torch.Tensor, counts: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, query_position: int,
) -> None:  # fmt: skip
    """Same signature and effect as `reference.append_token`, in one launch (a decoding step's
    two dozen small writes and rotations were as many launches)."""
    batch, n_kv_heads, _, head_dim = k.shape
    n_q_heads = q.shape[1]
    if k.shape[2] != 1 or q.shape[2] != 1 or head_dim % 2:
        raise ValueError(f"append_token takes one token: k {tuple(k.shape)}, q {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v), ("q", q), ("local_k", local_k), ("local_v", local_v),
                    ("local_rotated", local_rotated), ("queries", queries)):  # fmt: skip
        if x.stride(-1) != 1:
            raise ValueError(f"append_token needs {name}'s last dimension dense")
    if local_k.stride() != local_v.stride() or local_k.stride() != local_rotated.stride():
        raise ValueError("append_token needs the local buffers of one layout")
    if local_mass.stride(-1) != 1 or local_mass.dtype != torch.float32:
        raise ValueError("append_token needs local_mass fp32 with its last dimension dense")
    if counts.dtype != torch.int32 or counts.numel() < 3:
        raise ValueError("append_token needs counts int32 [local length, units, ring slot]")
    if cos.dtype != torch.float32 or not cos.is_contiguous() or cos.stride() != sin.stride():
        raise ValueError("append_token needs dense fp32 cos/sin tables")
    append_token_kernel[(1,)](
        k, v, q, local_k, local_v, local_mass, local_rotated, queries, counts, cos, sin,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), q.stride(0), q.stride(1),
        local_k.stride(0), local_k.stride(1), local_k.stride(2),
        local_mass.stride(0), local_mass.stride(1),
        queries.stride(0), queries.stride(1), queries.stride(2),
        cos.stride(0), n_kv_heads, n_q_heads, batch * n_kv_heads, batch * n_q_heads,
        query_position, queries.shape[2],
        HALF=head_dim // 2, BKV=triton.next_power_of_2(batch * n_kv_heads),
        BQ=triton.next_power_of_2(batch * n_q_heads), num_warps=4,
    )  # fmt: skip


# Entries a row up to which `top_units` ranks every unit against every other in one launch (N^2
# comparisons, over N / RANK_BLOCK programs a row). Beyond, it ranks segments of `RANK_SEGMENT`
# units against their own segment and keeps each one's top k, then ranks those candidates, and so
# on: N x segment comparisons rather than N^2 (at 16K units an H200 took 88 us for torch's topk).
RANK_ONE_LAUNCH_MAX = 512
RANK_SEGMENT = 256
# Units a program ranks, and compared at a time: on an H200, 32 against 256 ranked 480 units in
# 3.6 us and a 16K-unit row's segments in 15, where 64 against 64 took 6.6 and 30.
RANK_BLOCK, RANK_AGAINST = 32, 256


@triton.jit
def top_units_kernel(
    mass, ids, out_ids, out_mass, N, SEGMENT, K,
    BI: tl.constexpr, BJ: tl.constexpr, GATHER: tl.constexpr, KEEP_MASS: tl.constexpr,
):  # fmt: skip
    """Each program ranks BI entries of one row against the others of their segment of SEGMENT
    entries (ties: the lower position first) and writes each of the segment's top K at its rank:
    one entry per slot, so no two programs write the same. Entries are ids `o_i`, or read from
    `ids` (GATHER: candidates of an earlier launch); KEEP_MASS writes their masses too, and the
    slots of a segment shorter than K get -inf, so that the next launch ranks them last."""
    row, i_prog = tl.program_id(0).to(tl.int64), tl.program_id(1)
    per_segment = tl.cdiv(SEGMENT, BI)
    i_seg = i_prog // per_segment
    start = i_seg * SEGMENT
    end = tl.minimum(start + SEGMENT, N)
    o_i = start + (i_prog % per_segment) * BI + tl.arange(0, BI)
    m_i = o_i < end
    b_i = tl.load(mass + row * N + o_i, mask=m_i, other=float("-inf"))
    rank = tl.zeros([BI], tl.int32)
    for first in range(start, end, BJ):
        o_j = first + tl.arange(0, BJ)
        b_j = tl.load(mass + row * N + o_j, mask=o_j < end, other=float("-inf"))
        ahead = (b_j[None, :] > b_i[:, None]) | (
            (b_j[None, :] == b_i[:, None]) & (o_j[None, :] < o_i[:, None])
        )
        rank += tl.sum(ahead.to(tl.int32), 1)
    n_segments = tl.cdiv(N, SEGMENT)
    p_out = (row * n_segments + i_seg) * K + rank
    kept = m_i & (rank < K)
    if GATHER:
        tl.store(out_ids + p_out, tl.load(ids + row * N + o_i, mask=kept), mask=kept)
    else:
        tl.store(out_ids + p_out, o_i.to(tl.int64), mask=kept)
    if KEEP_MASS:
        tl.store(out_mass + p_out, b_i, mask=kept)
        if i_prog % per_segment == 0:  # a short last segment: its empty slots rank last
            o_k = tl.arange(0, BI)
            p_empty = (row * n_segments + i_seg) * K + o_k
            for first in range(0, K, BI):
                m_empty = (first + o_k >= end - start) & (first + o_k < K)
                tl.store(out_mass + first + p_empty, float("-inf"), mask=m_empty)
                tl.store(out_ids + first + p_empty, -1, mask=m_empty)


def top_units(mass: torch.Tensor, k: int, *, ascending: bool = True) -> torch.Tensor:
    """Same signature and results as `reference.top_units` (ties: the lower id first): one launch
    for up to `RANK_ONE_LAUNCH_MAX` units a row; beyond, segments keep their top k and the
    candidates are ranked again, in segments again while more than `RANK_ONE_LAUNCH_MAX` remain
    (at k = 32, beyond 4,096 units)."""
    n_units = mass.shape[-1]
    if not 0 <= k <= n_units:
        raise ValueError(f"top_units: k={k} of {n_units} units")
    if k == 0:
        return torch.empty((*mass.shape[:-1], 0), dtype=torch.int64, device=mass.device)
    mass = mass.contiguous()
    rows = mass.numel() // n_units
    candidates, candidate_ids = mass, None
    segment = max(RANK_SEGMENT, 4 * triton.next_power_of_2(k))  # each keeps a quarter at most
    while candidates.shape[-1] > max(RANK_ONE_LAUNCH_MAX, segment):
        n = candidates.shape[-1]
        n_segments = triton.cdiv(n, segment)
        out_ids = torch.empty((rows, n_segments * k), dtype=torch.int64, device=mass.device)
        out_mass = torch.empty((rows, n_segments * k), dtype=mass.dtype, device=mass.device)
        top_units_kernel[(rows, n_segments * triton.cdiv(segment, RANK_BLOCK))](
            candidates, candidate_ids, out_ids, out_mass, n, segment, k,
            BI=RANK_BLOCK, BJ=RANK_AGAINST, GATHER=candidate_ids is not None, KEEP_MASS=True,
            num_warps=4,
        )  # fmt: skip
        candidates, candidate_ids = out_mass, out_ids
    n = candidates.shape[-1]
    ids = torch.empty((*mass.shape[:-1], k), dtype=torch.int64, device=mass.device)
    top_units_kernel[(rows, triton.cdiv(n, RANK_BLOCK))](
        candidates, candidate_ids, ids, ids, n, n, k,
        BI=RANK_BLOCK, BJ=RANK_AGAINST, GATHER=candidate_ids is not None, KEEP_MASS=False,
        num_warps=4,
    )  # fmt: skip
    return torch.sort(ids, dim=-1).values if ascending else ids
