"""Triton kernel for `placed_attention`: attention over a window of pre-RoPE keys cut into
placements, each key and query rotated in-kernel to its assigned position (from the model's own
cos/sin table), every placement under one online softmax, GQA by stacking a key head's query heads
as rows, and split-K over the window so that a decode step fills the GPU.

Three levels: `placed_attention_fwd_kernel` (no Python logic) -> `placed_attention` (validates,
picks blocks, launches, merges the splits) -> `agentmem.memory.policy` (module glue).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agentmem_kernels.fit import launch_fitted
from agentmem_kernels.reference import key_mass

NO_LIMIT = 2**30  # "no max_dist"
# How fp32 inputs are multiplied: three tf32 tensor-core products (hi*hi + hi*lo + lo*hi), about
# fp32's accuracy. Plain fp32 ("ieee") dots run as FMA loops: a Gemma-3 fp32 prefill chunk spent
# 47 ms per global layer in the memory attention that way on an H100, and compiled for minutes.
FP32_DOT = tl.constexpr("tf32x3")


def _alloc(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uninitialised scratch, fp32 unless said (tests poison it with NaN to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def placed_attention_fwd_kernel(
    q, k, v, q_pos, k_pos, q_abs, k_abs, cos, sin, parts, acc_out, m_out, l_out,
    scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kk,
    stride_pb, stride_ph,
    stride_cn,
    T, HKV, ROWS,
    G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NUM_PARTS: tl.constexpr, NSPLIT: tl.constexpr,
    EXACT: tl.constexpr,
):  # fmt: skip
    i_bh, i_m, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_r = i_m * BM + tl.arange(0, BM)  # rows: g * T + t
    m_r = o_r < G * T
    i_g, i_t = o_r // T, o_r % T
    o_half = tl.arange(0, HALF)
    o_d = tl.arange(0, D)
    dot_ty = q.dtype.element_ty

    # [BM, HALF] the two halves of each row's query
    p_q = q + i_b * stride_qb + (i_h * G + i_g)[:, None] * stride_qh + i_t[:, None] * stride_qt
    b_q1 = tl.load(p_q + o_half[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
    b_q2 = tl.load(p_q + HALF + o_half[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
    b_qa = tl.load(q_abs + i_t, mask=m_r, other=0)

    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, D], tl.float32)
    p_kv = i_b * stride_kb + i_h * stride_kh
    p_pos = i_b * stride_pb + i_h * stride_ph
    for i_p in tl.static_range(NUM_PARTS):
        start = tl.load(parts + i_p * 4)
        stop = tl.load(parts + i_p * 4 + 1)
        min_dist = tl.load(parts + i_p * 4 + 2)
        max_dist = tl.load(parts + i_p * 4 + 3)
        # [BM, HALF] queries rotated to this placement's positions
        b_qp = tl.load(q_pos + i_p * T + i_t, mask=m_r, other=0)
        p_cq = b_qp[:, None] * stride_cn + o_half[None, :]
        b_c1, b_c2 = tl.load(cos + p_cq), tl.load(cos + p_cq + HALF)
        b_s1, b_s2 = tl.load(sin + p_cq), tl.load(sin + p_cq + HALF)
        b_r1 = (b_q1 * b_c1 - b_q2 * b_s1).to(dot_ty)
        b_r2 = (b_q2 * b_c2 + b_q1 * b_s2).to(dot_ty)
        # this split's share of the placement's keys, in whole blocks
        per_split = tl.cdiv(tl.cdiv(stop - start, BN), NSPLIT) * BN
        lo = start + i_s * per_split
        hi = tl.minimum(lo + per_split, stop)
        for i_k in range(lo, hi, BN):
            o_k = i_k + tl.arange(0, BN)
            m_k = o_k < hi
            b_kp = tl.load(k_pos + p_pos + o_k, mask=m_k, other=0)
            b_ka = tl.load(k_abs + p_pos + o_k, mask=m_k, other=0)
            p_k = k + p_kv + o_k[:, None] * stride_kk
            # [BN, HALF] keys rotated to their positions
            b_k1 = tl.load(p_k + o_half[None, :], mask=m_k[:, None], other=0.0).to(tl.float32)
            b_k2 = tl.load(p_k + HALF + o_half[None, :], mask=m_k[:, None], other=0.0).to(
                tl.float32
            )
            p_ck = b_kp[:, None] * stride_cn + o_half[None, :]
            b_kc1, b_kc2 = tl.load(cos + p_ck), tl.load(cos + p_ck + HALF)
            b_ks1, b_ks2 = tl.load(sin + p_ck), tl.load(sin + p_ck + HALF)
            b_kr1 = (b_k1 * b_kc1 - b_k2 * b_ks1).to(dot_ty)
            b_kr2 = (b_k2 * b_kc2 + b_k1 * b_ks2).to(dot_ty)
            # [BM, BN] scaled logits, masked by distance in the stream
            if EXACT:  # fp32 inputs: near-fp32 products (FP32_DOT), not one tf32 pass
                b_s = tl.dot(b_r1, tl.trans(b_kr1), input_precision=FP32_DOT)
                b_s += tl.dot(b_r2, tl.trans(b_kr2), input_precision=FP32_DOT)
            else:
                b_s = tl.dot(b_r1, tl.trans(b_kr1)) + tl.dot(b_r2, tl.trans(b_kr2))
            dist = b_qa[:, None] - b_ka[None, :]
            m_vis = m_k[None, :] & (dist >= min_dist) & (dist < max_dist) & m_r[:, None]
            b_s = tl.where(m_vis, b_s * scale, float("-inf"))
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows that saw nothing
            b_alpha = tl.exp(b_m - b_m_safe)
            b_p = tl.exp(b_s - b_m_safe[:, None])
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            p_v = v + p_kv + o_k[:, None] * stride_kk + o_d[None, :]
            b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)
            if EXACT:
                b_pv = tl.dot(b_p, b_v.to(tl.float32), input_precision=FP32_DOT)
            else:
                b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
            b_acc = b_acc * b_alpha[:, None] + b_pv
            b_m = b_m_new

    # partial results of this split: [NSPLIT, B * HKV, ROWS(, D)]
    o_out = (i_s * (tl.num_programs(0)) + i_bh) * ROWS + o_r
    tl.store(acc_out + o_out[:, None] * D + o_d[None, :], b_acc, mask=m_r[:, None])
    tl.store(m_out + o_out, b_m, mask=m_r)
    tl.store(l_out + o_out, b_l, mask=m_r)


def merge_splits(
    acc: torch.Tensor,
    m: torch.Tensor,
    l: torch.Tensor,  # noqa: E741
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of split-K partials [S, ..., (D)]: out [..., D], lse [...].
    Rows that saw no key get out 0 and lse -inf."""
    m_max = m.amax(dim=0)
    m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    weight = torch.exp(m - m_safe)
    total = (l * weight).sum(dim=0)
    out = (acc * weight.unsqueeze(-1)).sum(dim=0) / total.clamp(min=1e-30).unsqueeze(-1)
    return out, m_safe + torch.log(total)


def supports(q: torch.Tensor) -> str | None:
    """Why the kernel cannot take these queries, or None if it can."""
    head_dim = q.shape[-1]
    if head_dim < 32 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 32"
    return None


def _launch_config(rows: int, head_dim: int, element_size: int) -> dict:
    """Blocks by rows (decode: few) and head size; fp32 tiles weigh as a head twice as wide."""
    width = head_dim * element_size // 2
    block_m = 16 if rows <= 16 else 64 if width <= 256 else 32
    return dict(BM=block_m, BN=64 if width <= 128 else 32, num_warps=4, num_stages=3)


def _launch(
    q, k, v, q_pos, k_pos, q_abs, k_abs, cos, sin, parts, *,
    config: dict, scale: float, group: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One launch over every (batch, key head), row tile and split: the splits' partials
    acc [S, B * Hkv, rows, D], m and l [S, B * Hkv, rows]."""
    batch, n_queries, head_dim = q.shape[0], q.shape[2], q.shape[-1]
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    rows = group * n_queries
    row_tiles = triton.cdiv(rows, config["BM"])
    # Decode has few rows: split the window so that every multiprocessor gets work.
    splits = 1 if row_tiles > 1 else max(1, min(32, n_keys // (4 * config["BN"])))
    shape = (splits, batch * n_kv_heads, rows)
    acc = _alloc((*shape, head_dim), q.device)
    m, l = _alloc(shape, q.device), _alloc(shape, q.device)  # noqa: E741
    placed_attention_fwd_kernel[(batch * n_kv_heads, row_tiles, splits)](
        q, k, v, q_pos, k_pos, q_abs, k_abs, cos, sin, parts, acc, m, l,
        scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        k_pos.stride(0), k_pos.stride(1),
        cos.stride(0),
        n_queries, n_kv_heads, rows,
        G=group, D=head_dim, HALF=head_dim // 2, NUM_PARTS=parts.shape[0], NSPLIT=splits,
        EXACT=q.dtype == torch.float32,
        **config,
    )  # fmt: skip
    return acc, m, l


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
    """Same signature and results as `reference.placed_attention`. The kernel computes out and
    lse; `mass`, when asked for, is recomputed from lse by `reference.key_mass`."""
    batch, n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    if n_q_heads % n_kv_heads or k.shape != v.shape or k.shape[0] != batch:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} do not match")
    if (reason := supports(q)) is not None:
        raise ValueError(f"the Triton kernel cannot run this: {reason}")
    if k_pos.shape != (batch, n_kv_heads, n_keys) or k_abs.shape != k_pos.shape:
        raise ValueError("k_pos and k_abs must be [B, Hkv, K]")
    if q_pos.shape != (len(parts), n_queries) or cos.shape[-1] != head_dim:
        raise ValueError("q_pos must be [P, T] and cos/sin [N, D]")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k_pos, k_abs = k_pos.to(torch.int32).contiguous(), k_abs.to(torch.int32).contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    table = [(a, b, lo, NO_LIMIT if hi is None else hi) for a, b, lo, hi in parts]
    parts_t = torch.tensor(table, dtype=torch.int32, device=q.device)

    inputs = (
        q, k, v, q_pos.to(torch.int32).contiguous(), k_pos, q_abs.to(torch.int32).contiguous(),
        k_abs, cos, sin, parts_t,
    )  # fmt: skip
    acc, m, l = launch_fitted(  # noqa: E741
        "placed_attention",
        lambda config: _launch(*inputs, config=config, scale=scale, group=group),
        _launch_config(group * n_queries, head_dim, q.element_size()),
        key=(q.device, q.dtype, head_dim),
    )
    out, lse = merge_splits(acc, m, l)
    # rows are (g, t) per key head: back to [B, Hq, T, D]
    out = out.view(batch, n_kv_heads, group, n_queries, head_dim).reshape(q.shape)
    lse = lse.view(batch, n_q_heads, n_queries)
    if mass_from is None:
        return out, lse, None
    mass = key_mass(
        q, k, lse=lse, q_pos=q_pos, k_pos=k_pos, q_abs=q_abs, k_abs=k_abs, parts=parts,
        cos=cos, sin=sin, scale=scale, mass_from=mass_from,
    )  # fmt: skip
    return out, lse, mass
