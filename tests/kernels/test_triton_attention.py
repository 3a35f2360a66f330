"""The Triton `placed_attention` kernel against its pure-torch reference: one and two placements,
GQA, per-head positions, partial blocks, split-K decode, rows that see nothing, fp32 and fp16, with
scratch poisoned by NaN so that an unwritten element fails. Runs in Triton's interpreter on the CPU
(tests/conftest.py sets TRITON_INTERPRET) and natively on a GPU."""

from __future__ import annotations

import pytest
import torch

from agentmem_kernels import reference
from tests.helpers import PlainRope

triton_attention = pytest.importorskip("agentmem_kernels.triton_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poisoned_scratch")


def _table(n_positions: int, head_dim: int):
    cos, sin = PlainRope(head_dim).table(n_positions, torch.float32, torch.device(DEVICE))
    return cos, sin


def _case(n_queries, n_keys, *, head_dim=32, heads=(4, 2), dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    n_q, n_kv = heads
    q = torch.randn(2, n_q, n_queries, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(2, n_kv, n_keys, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(2, n_kv, n_keys, head_dim, dtype=dtype, device=DEVICE)
    return q, k, v


def _compare(q, k, v, **kwargs):
    mass_from = kwargs["parts"][-1][0]  # the last placement's keys, as the local window's
    got, got_lse, got_mass = triton_attention.placed_attention(
        q, k, v, **kwargs, mass_from=mass_from
    )
    want, want_lse, want_mass = reference.placed_attention(q, k, v, **kwargs, mass_from=mass_from)
    torch.testing.assert_close(got_mass, want_mass, atol=2e-3, rtol=2e-3)
    seen = torch.isfinite(want_lse)
    error = (got - want).norm() / want.norm()
    bound = 2e-3 if q.dtype == torch.float16 else 1e-5
    assert error < bound, f"relative error {error:.2e}"
    assert torch.equal(torch.isfinite(got_lse), seen)
    torch.testing.assert_close(got_lse[seen], want_lse[seen], atol=1e-3, rtol=1e-4)
    assert torch.all(got[~seen] == 0)
    return got


def _positions(k_pos, batch=2, heads=2):
    return k_pos.to(DEVICE).expand(batch, heads, -1).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_causal_placement(dtype):
    q, k, v = _case(5, 70, dtype=dtype)
    cos, sin = _table(128, 32)
    k_abs = torch.arange(100, 170)
    _compare(
        q, k, v, q_pos=torch.arange(65, 70, device=DEVICE)[None],
        k_pos=_positions(torch.arange(70)), q_abs=torch.arange(165, 170, device=DEVICE),
        k_abs=_positions(k_abs),
        parts=[(0, 70, 0, None)], cos=cos, sin=sin, scale=0.3,
    )  # fmt: skip


def test_memory_at_one_distance_and_local_at_true_distances():
    """The infllm layout: 40 memory keys at position 0 seen from n_local, then 50 local keys."""
    q, k, v = _case(6, 90, head_dim=64)
    cos, sin = _table(256, 64)
    k_pos = torch.cat((torch.zeros(40, dtype=torch.long), torch.arange(50)))
    k_abs = torch.cat((torch.arange(40), torch.arange(500, 550)))
    q_pos = torch.stack((torch.full((6,), 200), torch.arange(44, 50))).to(DEVICE)
    _compare(
        q, k, v, q_pos=q_pos, k_pos=_positions(k_pos), q_abs=torch.arange(544, 550, device=DEVICE),
        k_abs=_positions(k_abs), parts=[(0, 40, 0, None), (40, 90, 0, None)],
        cos=cos, sin=sin, scale=0.125,
    )  # fmt: skip


def test_per_head_positions_and_distance_bands():
    """The selfextend layout: the same keys twice, near (dist < 8) and far (dist >= 8)."""
    q, k, v = _case(3, 40, heads=(4, 2))
    k, v = torch.cat((k, k), dim=2), torch.cat((v, v), dim=2)
    cos, sin = _table(128, 32)
    torch.manual_seed(1)
    k_abs = torch.stack([torch.sort(torch.randperm(60)[:40]).values for _ in range(4)]).view(
        2, 2, 40
    )
    k_abs = torch.cat((k_abs, k_abs), dim=2).to(DEVICE)
    k_pos = torch.cat((k_abs[..., :40] % 50, k_abs[..., 40:] // 4), dim=2)
    q_pos = torch.tensor([[57, 58, 59], [20, 20, 21]], device=DEVICE)
    _compare(
        q, k, v, q_pos=q_pos, k_pos=k_pos, q_abs=torch.arange(57, 60, device=DEVICE), k_abs=k_abs,
        parts=[(0, 40, 0, 8), (40, 80, 8, None)], cos=cos, sin=sin, scale=0.3,
    )  # fmt: skip


def test_decode_splits_the_window_and_merges_exactly():
    q, k, v = _case(1, 600, heads=(8, 2))
    cos, sin = _table(1024, 32)
    k_pos = torch.arange(600)
    _compare(
        q, k, v, q_pos=torch.tensor([[599]], device=DEVICE), k_pos=_positions(k_pos),
        q_abs=torch.tensor([9000], device=DEVICE), k_abs=_positions(k_pos + 8401),
        parts=[(0, 600, 0, None)], cos=cos, sin=sin, scale=0.2,
    )  # fmt: skip


def test_queries_that_see_nothing_get_zero():
    q, k, v = _case(4, 20)
    cos, sin = _table(64, 32)
    out = _compare(
        q, k, v, q_pos=torch.arange(4, device=DEVICE)[None], k_pos=_positions(torch.arange(20)),
        q_abs=torch.tensor([0, 1, 30, 31], device=DEVICE), k_abs=_positions(torch.arange(10, 30)),
        parts=[(0, 20, 0, None)], cos=cos, sin=sin, scale=0.3,
    )  # fmt: skip
    assert torch.all(out[:, :, :2] == 0)


def test_bad_shapes_are_refused():
    q, k, v = _case(2, 8, head_dim=24)
    cos, sin = _table(16, 24)
    with pytest.raises(ValueError, match="power of two"):
        assert triton_attention.supports(q) is not None
        triton_attention.placed_attention(
            q, k, v, q_pos=torch.zeros(1, 2, dtype=torch.long), k_pos=_positions(torch.arange(8)),
            q_abs=torch.arange(2), k_abs=_positions(torch.arange(8)), parts=[(0, 8, 0, None)],
            cos=cos, sin=sin, scale=1.0,
        )  # fmt: skip
