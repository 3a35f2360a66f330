"""The pure-torch references against brute-force loops and transformers' own RoPE."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from agentmem_kernels import (
    KeySegment,
    attention,
    gather_units,
    merge,
    rope,
    score_units,
    segment_attention,
    unit_logits,
)


def _random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def _brute_attention(q, k, v, scale, q_abs, k_abs, min_dist, max_dist):
    """One query, one head at a time."""
    batch, n_q_heads, n_queries, _ = q.shape
    group = n_q_heads // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=q.dtype)
    for b in range(batch):
        for h in range(n_q_heads):
            kv = h // group
            for t in range(n_queries):
                keys_abs = k_abs if k_abs.dim() == 1 else k_abs[b, kv]
                dist = q_abs[t] - keys_abs
                ok = (dist >= min_dist) & ((dist < max_dist) if max_dist else True)
                if not ok.any():
                    continue
                logits = (k[b, kv][ok] @ q[b, h, t]) * scale
                lse[b, h, t] = torch.logsumexp(logits, 0)
                out[b, h, t] = torch.softmax(logits, 0) @ v[b, kv][ok]
    return out, lse


# (8, 3): a window no query sees any key through (output 0, lse -inf).
@pytest.mark.parametrize(("min_dist", "max_dist"), [(0, None), (0, 5), (4, None), (8, 3)])
@pytest.mark.parametrize("per_head_abs", [False, True])
@pytest.mark.parametrize("with_probs", [True, False])  # False: torch's CPU flash kernel, on a CPU
def test_attention_matches_brute_force(min_dist, max_dist, per_head_abs, with_probs):
    torch.manual_seed(0)
    q, k, v = _random(2, 4, 7, 8), _random(2, 2, 11, 8), _random(2, 2, 11, 8)
    q_abs = torch.arange(20, 27)
    k_abs = torch.arange(16, 27)
    if per_head_abs:
        k_abs = torch.stack([torch.randperm(27)[:11] for _ in range(4)]).view(2, 2, 11)
    out, lse, probs = attention(
        q,
        k,
        v,
        scale=0.3,
        q_abs=q_abs,
        k_abs=k_abs,
        min_dist=min_dist,
        max_dist=max_dist,
        return_probs=with_probs,
    )
    want_out, want_lse = _brute_attention(q, k, v, 0.3, q_abs, k_abs, min_dist, max_dist)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    if not with_probs:
        assert probs is None
        return
    seen = torch.isfinite(want_lse)
    sums = probs.sum(-1)[seen].double()
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)


def test_fused_path_matches_materialized():
    torch.manual_seed(1)
    q, k, v = (
        _random(1, 4, 9, 16).float(),
        _random(1, 1, 30, 16).float(),
        _random(1, 1, 30, 16).float(),
    )
    q_abs, k_abs = torch.arange(21, 30), torch.arange(30)
    slow, _, _ = attention(q, k, v, scale=0.25, q_abs=q_abs, k_abs=k_abs, max_dist=12)
    fast, lse, _ = attention(
        q, k, v, scale=0.25, q_abs=q_abs, k_abs=k_abs, max_dist=12, return_lse=False
    )
    assert lse is None
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_merge_of_two_halves_equals_attention_over_both():
    torch.manual_seed(2)
    q, k, v = _random(1, 2, 5, 8), _random(1, 2, 12, 8), _random(1, 2, 12, 8)
    q_abs, k_abs = torch.arange(12, 17), torch.arange(12)
    whole, whole_lse, _ = attention(q, k, v, scale=0.5, q_abs=q_abs, k_abs=k_abs)
    a = attention(q, k[:, :, :5], v[:, :, :5], scale=0.5, q_abs=q_abs, k_abs=k_abs[:5])
    b = attention(q, k[:, :, 5:], v[:, :, 5:], scale=0.5, q_abs=q_abs, k_abs=k_abs[5:])
    out, lse = merge(a[0], a[1], b[0], b[1])
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)


def test_merge_ignores_a_side_that_saw_nothing():
    torch.manual_seed(3)
    out = torch.randn(1, 1, 3, 4)
    lse = torch.randn(1, 1, 3)
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge(empty_out, empty_lse, out, lse)
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)


def test_rope_matches_transformers():
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8)
    angle = torch.randn(1, 6, 8)
    cos, sin = angle.cos(), angle.sin()
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rope(q, cos[:, None], sin[:, None]), want_q)
    torch.testing.assert_close(rope(k, cos[:, None], sin[:, None]), want_k)


def _brute_unit_scores(q, reps, kind, scale):
    batch, n_q_heads, n_queries, _ = q.shape
    n_kv, n_units = reps.shape[1], reps.shape[2]
    group = n_q_heads // n_kv
    mass = torch.zeros(batch, n_kv, n_units, dtype=q.dtype)
    for b in range(batch):
        for h in range(n_q_heads):
            for t in range(n_queries):
                logits = torch.empty(n_units, dtype=q.dtype)
                for u in range(n_units):
                    r = reps[b, h // group, u]
                    if kind == "dot":
                        logits[u] = (r @ q[b, h, t]).max()
                    else:
                        half = r.shape[0] // 2
                        lows, highs = r[:half], r[half:]
                        bound = torch.maximum(lows * q[b, h, t], highs * q[b, h, t]).sum(-1)
                        logits[u] = bound.max()
                mass[b, h // group] += torch.softmax(logits * scale, 0)
    return mass


@pytest.mark.parametrize("kind", ["dot", "minmax"])
def test_score_units_is_the_exact_top_k(kind):
    torch.manual_seed(5)
    q, reps = _random(2, 4, 3, 8), _random(2, 2, 9, 4, 8)
    if kind == "minmax":
        reps = torch.cat((reps.amin(3, keepdim=True), reps.amax(3, keepdim=True)), dim=3)
    ids = score_units(q, reps, kind=kind, scale=0.5, k=4)
    mass = _brute_unit_scores(q, reps, kind, 0.5)
    want = torch.sort(torch.topk(mass, 4, dim=-1).indices, dim=-1).values
    assert torch.equal(ids, want)
    assert ids.shape == (2, 2, 4)


def test_minmax_logit_bounds_every_key_in_the_box():
    torch.manual_seed(6)
    keys = torch.randn(1, 1, 5, 16, 8)  # 5 units of 16 keys
    reps = torch.stack((keys.amin(3), keys.amax(3)), dim=3)  # [1, 1, 5, 2, 8]
    q = torch.randn(1, 2, 4, 8)
    bound = unit_logits(q, reps, kind="minmax")  # [1, 1, 2, 4, 5]
    exact = torch.einsum("bgtd,bnud->bgtnu", q, keys[:, 0]).amax(-1)  # [1, 2, 4, 5]
    assert (bound[:, 0] >= exact - 1e-5).all()


def test_gather_units_picks_the_right_tokens():
    pool = torch.arange(2 * 3 * 12 * 2, dtype=torch.float32).view(2, 3, 12, 2)  # 4 units of 3
    ids = torch.tensor([[[0, 3], [1, 2], [3, 0]], [[2, 2], [0, 1], [1, 3]]])
    got = gather_units(pool, ids, 3)
    for b in range(2):
        for h in range(3):
            want = torch.cat([pool[b, h, 3 * i : 3 * i + 3] for i in ids[b, h].tolist()])
            assert torch.equal(got[b, h], want)


def test_segments_under_one_softmax_equal_merged_attentions():
    torch.manual_seed(7)
    q_abs = torch.arange(30, 36)
    parts = []
    for n_keys, first, min_dist, max_dist in [(9, 0, 0, None), (12, 24, 0, 4), (7, 10, 3, None)]:
        parts.append(
            KeySegment(
                q=_random(2, 4, 6, 8), k=_random(2, 2, n_keys, 8), v=_random(2, 2, n_keys, 8),
                k_abs=torch.arange(first, first + n_keys), min_dist=min_dist, max_dist=max_dist,
            )
        )  # fmt: skip
    out, lse, probs = segment_attention(
        parts, q_abs=q_abs, scale=0.4, return_lse=True, return_probs=True
    )
    singles = [
        attention(
            p.q, p.k, p.v, scale=0.4, q_abs=q_abs, k_abs=p.k_abs, min_dist=p.min_dist,
            max_dist=p.max_dist,
        )
        for p in parts
    ]  # fmt: skip
    want, want_lse = singles[0][0], singles[0][1]
    for single in singles[1:]:
        want, want_lse = merge(want, want_lse, single[0], single[1])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 4, 6, 9 + 12 + 7)
    # without probs (on a CPU: each segment through torch's flash kernel, merged)
    fast, fast_lse, none = segment_attention(parts, q_abs=q_abs, scale=0.4, return_lse=True)
    assert none is None
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_lse, lse, atol=1e-5, rtol=1e-5)
