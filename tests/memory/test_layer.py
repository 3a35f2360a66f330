"""MemoryLayer bookkeeping: sinks, units and local window hold the right tokens, the window stays
bounded however long the stream, and retrieval follows the representatives."""

from __future__ import annotations

import pytest
import torch

import agentmem.memory.layer as memory_layer
from agentmem.config import MemoryConfig
from agentmem.memory.layer import MemoryLayer
from agentmem.memory.representatives import representatives
from agentmem.memory.sliding import SlidingLayer
from agentmem_kernels import rope, score_units, unit_mass
from tests.helpers import PlainRope

D = 8


def _stream(layer, n_tokens, step, n_q_heads=4, n_kv_heads=2, seed=0, keys=None):
    """Feed n_tokens tokens in steps of `step`; returns all keys and values fed."""
    torch.manual_seed(seed)
    if keys is None:
        keys = torch.randn(1, n_kv_heads, n_tokens, D)
    values = torch.randn(1, n_kv_heads, n_tokens, D)
    for first in range(0, n_tokens, step):
        piece = slice(first, first + step)
        k, v = keys[:, :, piece], values[:, :, piece]
        layer.store(k, v)
        out = layer.attend(torch.randn(1, n_q_heads, k.shape[2], D), scale=D**-0.5)
        assert out.shape == (1, n_q_heads, k.shape[2], D)
        assert torch.isfinite(out).all()
    return keys, values


CONFIG = MemoryConfig(n_init=5, n_local=40, unit_size=8, topk=2, repr_topk=2, exec_chunk=16)


@pytest.mark.parametrize("step", [1, 7, 16, 50])
def test_tokens_land_in_sinks_units_and_local_in_order(step):
    layer = MemoryLayer(CONFIG, PlainRope(D))
    keys, values = _stream(layer, 203, step)
    assert layer.seen == 203
    assert torch.equal(layer.sink_k, keys[:, :, :5])
    n_packed = layer.units.n_units * 8
    assert torch.equal(layer.units.keys.data, keys[:, :, 5 : 5 + n_packed])
    assert torch.equal(layer.units.values.data, values[:, :, 5 : 5 + n_packed])
    assert torch.equal(layer.local_k, keys[:, :, 5 + n_packed :])
    assert layer.n_local <= 40
    assert layer.local_start == 5 + n_packed
    assert layer.units.span(0) == (5, 13)


@pytest.mark.parametrize("position", ["infllm", "stacked", "contiguous", "selfextend"])
def test_attended_keys_never_exceed_the_window(monkeypatch, position):
    attended = []
    real_attend, real_in_place = memory_layer.attend, memory_layer.memory_attention

    def spy(q, window, **kwargs):
        attended.append(window.k.shape[2])
        return real_attend(q, window, **kwargs)

    def spy_in_place(q, **kwargs):
        n_units = 0 if kwargs["ids"] is None else kwargs["ids"].shape[-1]
        n_sinks = 0 if kwargs["sink_k"] is None else kwargs["sink_k"].shape[2]
        attended.append(n_sinks + n_units * kwargs["unit_size"] + int(kwargs["n_local"]))
        return real_in_place(q, **kwargs)

    monkeypatch.setattr(memory_layer, "attend", spy)
    monkeypatch.setattr(memory_layer, "memory_attention", spy_in_place)
    config = CONFIG.model_copy(update={"position": position})
    layer = MemoryLayer(config, PlainRope(D))
    _stream(layer, 600, 16)
    _stream(layer, 50, 1, seed=1)
    assert max(attended) == config.window == 5 + 2 * 8 + 40
    assert layer.units.n_units == (650 - 5 - layer.n_local) // 8


def test_streaming_drops_the_middle():
    config = MemoryConfig(**{**CONFIG.model_dump(), "position": "streaming", "topk": 0})
    layer = MemoryLayer(config, PlainRope(D))
    keys, _ = _stream(layer, 120, 16)
    assert layer.units.n_units == 0
    assert layer.dropped == 120 - 5 - layer.n_local
    assert torch.equal(layer.local_k, keys[:, :, 120 - layer.n_local :])
    assert layer.local_start == 120 - layer.n_local


def test_full_keeps_everything_local():
    config = MemoryConfig(position="full", topk=0)
    layer = MemoryLayer(config, PlainRope(D))
    keys, _ = _stream(layer, 70, 9)
    assert torch.equal(layer.local_k, keys)
    assert layer.n_sinks == 0 and layer.units.n_units == 0


def test_long_steps_are_cut_into_exec_chunks():
    whole = MemoryLayer(CONFIG, PlainRope(D))
    pieces = MemoryLayer(CONFIG, PlainRope(D))
    torch.manual_seed(3)
    k, v, q = torch.randn(1, 2, 64, D), torch.randn(1, 2, 64, D), torch.randn(1, 4, 64, D)
    whole.store(k, v)
    out_whole = whole.attend(q, scale=0.3)
    outs = []
    for first in range(0, 64, 16):
        pieces.store(k[:, :, first : first + 16], v[:, :, first : first + 16])
        outs.append(pieces.attend(q[:, :, first : first + 16], scale=0.3))
    torch.testing.assert_close(out_whole, torch.cat(outs, dim=2))


def test_retrieval_brings_back_the_unit_the_query_matches():
    layer = MemoryLayer(CONFIG, PlainRope(D, max_positions=64))
    target = 11  # a unit far from the local window
    first, end = 5 + target * 8, 5 + target * 8 + 8
    torch.manual_seed(4)
    keys = torch.randn(1, 2, 300, D)
    direction = torch.zeros(D)
    direction[0] = 1.0
    keys[:, :, first:end] += 8 * direction  # the unit stands out along one direction
    _stream(layer, 300, 16, keys=keys)
    assert layer.units.span(target) == (first, end)
    # A query along that direction, rotated back by the scoring distance it will be given.
    cos, sin = layer.rotary.cos_sin(torch.tensor(CONFIG.n_local), torch.float32, CONFIG.n_local + 1)
    query = rope((10 * direction).expand(1, 4, 1, D), cos, -sin)
    layer.store(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
    layer.attend(query, scale=1.0)
    assert layer.last_ids.shape == (1, 2, 2)
    assert (layer.last_ids == target).any(dim=-1).all()
    assert (first, end) in layer.attended_spans()


@pytest.mark.parametrize("query_window", [1, 12])
def test_a_decoded_token_chooses_units_with_the_queries_before_it(query_window):
    """A question (a step of several tokens) asks for one unit; the tokens decoded after it ask
    for nothing in particular. With a query window they keep choosing with the question's
    queries, so its unit stays retrieved; each alone does not find it."""
    config = CONFIG.model_copy(update={"query_window": query_window})
    layer = MemoryLayer(config, PlainRope(D, max_positions=64))
    target = 11
    first, end = 5 + target * 8, 5 + target * 8 + 8
    torch.manual_seed(4)
    keys = torch.randn(1, 2, 300, D)
    direction = torch.zeros(D)
    direction[0] = 1.0
    keys[:, :, first:end] += 8 * direction
    _stream(layer, 300, 16, keys=keys)
    cos, sin = layer.rotary.cos_sin(torch.tensor(config.n_local), torch.float32, config.n_local + 1)
    question = rope((10 * direction).expand(1, 4, 4, D), cos, -sin)
    layer.store(torch.randn(1, 2, 4, D), torch.randn(1, 2, 4, D))
    layer.attend(question, scale=1.0)
    assert (layer.last_ids == target).any(dim=-1).all()
    found = []
    for _ in range(6):  # decoded tokens: small random queries
        layer.store(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
        layer.attend(0.1 * torch.randn(1, 4, 1, D), scale=1.0)
        found.append(bool((layer.last_ids == target).any(dim=-1).all()))
    assert all(found) if query_window > 1 else not any(found)


def test_the_query_window_scores_the_latest_queries_exactly(monkeypatch):
    """A one-token step scores the units with exactly the latest `query_window` queries (its own
    last), rotated to the scoring distance; before that many were seen, zeros fill the window."""
    config = CONFIG.model_copy(update={"query_window": 5})
    layer = MemoryLayer(config, PlainRope(D, max_positions=64))
    fed = []
    real = MemoryLayer.attend

    def spy(self, q, scale):
        fed.append(q)
        return real(self, q, scale)

    monkeypatch.setattr(MemoryLayer, "attend", spy)
    _stream(layer, 2, 1)  # two queries: three zeros, then those two
    cos, sin = layer.rotary.cos_sin(torch.tensor(config.n_local), torch.float32, config.n_local + 1)
    rotated = [rope(q, cos, sin) for q in fed]
    torch.testing.assert_close(layer.recent_q[:, :, :3], torch.zeros(1, 4, 3, D))
    torch.testing.assert_close(layer.recent_q[:, :, 3:], torch.cat(rotated, dim=2))
    _stream(layer, 200, 7, seed=1)  # long steps, then a one-token step
    layer.store(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
    layer.attend(torch.randn(1, 4, 1, D), scale=1.0)
    rotated = [rope(q, cos, sin) for q in fed]
    latest = torch.cat(rotated, dim=2)[:, :, -5:]
    torch.testing.assert_close(layer.recent_q, latest)
    reps = layer.units.reps.data
    want = score_units(latest, reps, kind="dot", scale=1.0, k=config.topk, ascending=False)
    assert layer.last_ranked and torch.equal(layer.last_ids, want)  # by rank: read in place
    mass = unit_mass(latest, reps, kind="dot", scale=1.0)
    assert torch.equal(layer.last_ids[..., 0], mass.argmax(-1))  # rank 0: the largest mass


def test_attention_representatives_are_the_most_attended_keys():
    keys = torch.randn(1, 1, 2, 6, D)  # two units of 6
    mass = torch.tensor([[[[0.1, 0.9, 0.2, 0.8, 0.0, 0.3], [5.0, 0.0, 0.0, 0.0, 0.0, 4.0]]]])
    reps = representatives(keys, mass, kind="attention", r=2)
    assert torch.equal(reps[0, 0, 0], keys[0, 0, 0, [1, 3]])
    assert torch.equal(reps[0, 0, 1], keys[0, 0, 1, [0, 5]])


def test_mean_and_minmax_representatives_summarise_slices():
    keys = torch.randn(1, 1, 1, 6, D)
    mean = representatives(keys, torch.zeros(1, 1, 1, 6), kind="mean", r=2)
    torch.testing.assert_close(mean[0, 0, 0, 1], keys[0, 0, 0, 3:].mean(0))
    box = representatives(keys, torch.zeros(1, 1, 1, 6), kind="minmax", r=3)
    assert box.shape == (1, 1, 1, 6, D)
    torch.testing.assert_close(box[0, 0, 0, 0], keys[0, 0, 0, :2].amin(0))
    torch.testing.assert_close(box[0, 0, 0, 5], keys[0, 0, 0, 4:].amax(0))


def test_sliding_layer_keeps_its_window():
    layer = SlidingLayer(window=10, rotary=PlainRope(D))
    for _ in range(5):
        layer.store(torch.randn(1, 1, 7, D), torch.randn(1, 1, 7, D))
        layer.attend(torch.randn(1, 2, 7, D), scale=0.3)
    assert layer.seen == 35
    assert layer.k.shape[2] == 9 + 7


def test_attend_without_store_is_refused():
    layer = MemoryLayer(CONFIG, PlainRope(D))
    with pytest.raises(RuntimeError, match="cache update"):
        layer.attend(torch.randn(1, 4, 3, D), scale=0.3)
