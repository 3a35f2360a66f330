"""Each position policy against a pairwise oracle: logit(t, j) = (R(rel(t, j)) q_t) . k_j, with
rel(t, j) the distance the policy assigns, computed pair by pair."""

from __future__ import annotations

import pytest
import torch

from agentmem.config import MemoryConfig
from agentmem.memory.policy import Window, attend
from agentmem_kernels import rope
from tests.helpers import PlainRope

D = 16


def _window(n_sinks=3, n_retrieved=8, n_local=10, n_queries=4, per_head=False, start=40):
    """[sinks | retrieved | local] with stream indices; retrieved tokens come from the middle."""
    torch.manual_seed(0)
    n_keys = n_sinks + n_retrieved + n_local
    local_abs = torch.arange(start, start + n_local)
    retrieved_abs = torch.arange(10, 10 + n_retrieved)
    k_abs = torch.cat((torch.arange(n_sinks), retrieved_abs, local_abs))
    if per_head:
        other = torch.cat((torch.arange(n_sinks), retrieved_abs + 12, local_abs))
        k_abs = torch.stack((k_abs, other)).view(1, 2, -1)
    return Window(
        k=torch.randn(1, 2, n_keys, D, dtype=torch.float64),
        v=torch.randn(1, 2, n_keys, D, dtype=torch.float64),
        k_abs=k_abs,
        n_memory=n_sinks + n_retrieved,
        q_abs=local_abs[n_local - n_queries :],
    )


def _oracle(q, window, rel_of, rotary):
    """Dense attention with a per-pair relative distance; rel_of(t, j, head) -> int or None."""
    n_q_heads, n_queries = q.shape[1], q.shape[2]
    group = n_q_heads // window.k.shape[1]
    out = torch.zeros_like(q)
    for h in range(n_q_heads):
        kv = h // group
        for t in range(n_queries):
            logits, values = [], []
            for j in range(window.k.shape[2]):
                rel = rel_of(t, j, kv)
                if rel is None:
                    continue
                cos, sin = rotary.cos_sin(torch.tensor(rel), q.dtype)
                logits.append(rope(q[0, h, t], cos, sin) @ window.k[0, kv, j] * 0.25)
                values.append(window.v[0, kv, j])
            probs = torch.softmax(torch.stack(logits), 0)
            out[0, h, t] = probs @ torch.stack(values)
    return out


def _abs(window, j, kv):
    return int(window.k_abs[j] if window.k_abs.dim() == 1 else window.k_abs[0, kv, j])


def _run(config, window, rotary):
    q = torch.randn(1, 4, window.q_abs.shape[0], D, dtype=torch.float64)
    out, _ = attend(q, window, config=config, rotary=rotary, scale=0.25, want_mass=False)
    return q, out


def test_contiguous_renumbers_the_window():
    window, rotary = _window(), PlainRope(D)
    q, out = _run(MemoryConfig(position="contiguous"), window, rotary)
    n_keys, n_queries = window.k.shape[2], q.shape[2]

    def rel(t, j, kv):
        visible = _abs(window, j, kv) <= int(window.q_abs[t])
        return (n_keys - n_queries + t) - j if visible else None

    torch.testing.assert_close(out.double(), _oracle(q, window, rel, rotary), atol=1e-5, rtol=1e-5)


def test_infllm_puts_memory_at_distance_n_local():
    window, rotary = _window(), PlainRope(D)
    config = MemoryConfig(position="infllm", n_local=700)
    q, out = _run(config, window, rotary)
    n_local = window.k.shape[2] - window.n_memory

    def rel(t, j, kv):
        if j < window.n_memory:
            return 700
        i = j - window.n_memory
        q_local = n_local - q.shape[2] + t
        return q_local - i if i <= q_local else None

    torch.testing.assert_close(out.double(), _oracle(q, window, rel, rotary), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_positions", [4096, 20])
@pytest.mark.parametrize("per_head", [False, True])
def test_selfextend_groups_distant_keys(max_positions, per_head):
    window, rotary = _window(per_head=per_head), PlainRope(D, max_positions=max_positions)
    config = MemoryConfig(position="selfextend", selfextend_group=4, selfextend_window=8)
    q, out = _run(config, window, rotary)
    q_last = int(window.q_abs[-1]) // 4 + 8 - 2
    overflow = max(q_last - (max_positions - 1), 0)

    def rel(t, j, kv):
        q_abs, k_abs = int(window.q_abs[t]), _abs(window, j, kv)
        if k_abs > q_abs:
            return None
        if q_abs - k_abs < 8:
            return q_abs - k_abs
        q_group = q_abs // 4 + 8 - 2 - overflow
        return q_group - max(k_abs // 4 - overflow, 0)

    torch.testing.assert_close(out.double(), _oracle(q, window, rel, rotary), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["contiguous", "infllm", "selfextend"])
def test_local_mass_is_the_attention_local_keys_receive(position):
    window, rotary = _window(), PlainRope(D)
    # Queries 43..46 of a local part running to 49: the last three local keys are in their future.
    window.q_abs = window.q_abs - 3
    config = MemoryConfig(position=position, selfextend_group=4, selfextend_window=8)
    q = torch.randn(1, 4, window.q_abs.shape[0], D, dtype=torch.float64)
    _, mass = attend(q, window, config=config, rotary=rotary, scale=0.25, want_mass=True)
    # Every query spreads mass 1 over the window (memory included): the local share is at most
    # that; a key no query may see receives none, every other local key some.
    n_queries, n_q_heads = q.shape[2], q.shape[1]
    assert mass.shape == (1, 2, window.k.shape[2] - window.n_memory)
    assert float(mass.sum()) <= n_queries * n_q_heads + 1e-6
    future = window.k_abs[window.n_memory :] > window.q_abs[-1]
    assert int(future.sum()) == 3
    assert torch.all(mass[..., future] == 0)
    assert torch.all(mass[..., ~future] > 0)


def test_stacked_keeps_order_inside_each_unit():
    # 3 sinks, units of 4 from stream index 3: retrieved tokens 11..18 are two whole units.
    window, rotary = _window(n_retrieved=8), PlainRope(D)
    window.k_abs[3:11] = torch.arange(11, 19)
    window.unit_start = 3
    config = MemoryConfig(
        position="stacked", n_local=20, unit_size=4, n_init=3, repr_topk=2, exec_chunk=8
    )
    q, out = _run(config, window, rotary)
    n_local = window.k.shape[2] - window.n_memory
    q_memory = 20 + 4 - 1  # the query sits n_local + span - 1 after the stacked block

    def rel(t, j, kv):
        if j < window.n_memory:
            k_abs = _abs(window, j, kv)
            return q_memory - (k_abs if k_abs < 3 else (k_abs - 3) % 4)
        i = j - window.n_memory
        q_local = n_local - q.shape[2] + t
        return q_local - i if i <= q_local else None

    torch.testing.assert_close(out.double(), _oracle(q, window, rel, rotary), atol=1e-5, rtol=1e-5)
