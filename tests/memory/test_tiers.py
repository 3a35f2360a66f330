"""KV tiers (`device_units`): a memory whose unit pool is in host memory and whose steps read the
retrieved units from a small device cache attends exactly as one holding every unit on its device;
the cache's tables stay consistent with the pool through evictions, least recently used first."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from agentmem.config import MemoryConfig
from agentmem.memory.layer import MemoryLayer
from agentmem.memory.tiers import UnitCache
from tests.helpers import PlainRope

D = 8
CONFIG = MemoryConfig(n_init=5, n_local=40, unit_size=8, topk=3, repr_topk=2, exec_chunk=16)


def _inputs(n_tokens, step, seed=0, n_q_heads=4, n_kv_heads=2, batch=2):
    torch.manual_seed(seed)
    keys, values = torch.randn(2, batch, n_kv_heads, n_tokens, D)
    queries = torch.randn(batch, n_q_heads, n_tokens, D)
    return [
        (queries[:, :, i : i + step], keys[:, :, i : i + step], values[:, :, i : i + step])
        for i in range(0, n_tokens, step)
    ]


def _run(layer, steps):
    outs, ids = [], []
    for q, k, v in steps:
        layer.store(k, v)
        outs.append(layer.attend(q, scale=D**-0.5))
        ids.append(layer.last_ids)
    return outs, ids


def _check_tables(layer):
    """slot_of and unit_of are inverse maps, and every cached slot holds its unit's pool rows."""
    cache, unit = layer.units.cache, layer.config.unit_size
    pool_k, pool_v = layer.units.keys.data, layer.units.values.data
    n_slots = cache.n_slots
    for b in range(cache.unit_of.shape[0]):
        for h in range(cache.unit_of.shape[1]):
            units = cache.unit_of[b, h, :n_slots].tolist()
            held = [u for u in units if u >= 0]
            assert len(held) == len(set(held)), "a unit in two slots"
            for s, u in enumerate(units):
                if u < 0:
                    continue
                assert int(cache.slot_of[b, h, u]) == s
                rows = slice(s * unit, (s + 1) * unit)
                pool_rows = slice(u * unit, (u + 1) * unit)
                assert torch.equal(cache.keys[b, h, rows], pool_k[b, h, pool_rows])
                assert torch.equal(cache.values[b, h, rows], pool_v[b, h, pool_rows])
            slots = cache.slot_of[b, h, : layer.units.n_units]
            mapped = (slots >= 0).nonzero().flatten().tolist()
            assert sorted(mapped) == sorted(held), "slot_of names a unit no slot holds"


@pytest.mark.parametrize("position", ["infllm", "stacked"])
@pytest.mark.parametrize("step", [1, 7, 16])
@pytest.mark.parametrize("device_units", [3, 5])
def test_a_tiered_memory_attends_as_the_whole_one(position, step, device_units):
    config = CONFIG.model_copy(update={"position": position})
    whole = MemoryLayer(config, PlainRope(D))
    tiered = MemoryLayer(config.model_copy(update={"device_units": device_units}), PlainRope(D))
    steps = _inputs(260, step)
    want, want_ids = _run(whole, steps)
    got, got_ids = _run(tiered, steps)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_ids, want_ids, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert tiered.units.n_units == whole.units.n_units > device_units  # evictions happened
    assert tiered.units.cache.keys.shape[2] == device_units * config.unit_size
    _check_tables(tiered)
    rate = tiered.units.cache.hit_rate()
    assert rate is not None and 0 < rate < 1
    assert tiered.host_nbytes() == tiered.units.keys.nbytes() + tiered.units.values.nbytes() > 0
    assert whole.host_nbytes() == 0


def test_the_least_recently_used_unit_makes_way():
    cache = UnitCache(n_slots=3, unit_size=2)
    pool_k = torch.arange(1 * 1 * 6 * 2 * 1, dtype=torch.float32).view(1, 1, 12, 1)
    pool_v = -pool_k
    cache.reserve(pool_k, 6, torch.device("cpu"))

    def fetch(*units):
        slots = cache.fetch(torch.tensor([[list(units)]]), pool_k, pool_v)
        for u, s in zip(units, slots[0, 0].tolist(), strict=True):
            held = cache.keys[0, 0, 2 * s : 2 * s + 2]
            assert torch.equal(held, pool_k[0, 0, 2 * u : 2 * u + 2])
            assert torch.equal(cache.values[0, 0, 2 * s : 2 * s + 2], -held)
        return slots[0, 0].tolist()

    first = fetch(0, 1)  # two misses into the two free slots
    assert sorted(first) == [0, 1]
    fetch(2)  # the third free slot
    assert fetch(0) == [first[0]]  # a hit: unit 0 is the most recently used now
    slot_of_1 = first[1]
    assert fetch(3) == [slot_of_1]  # unit 1 was the least recently used
    assert int(cache.slot_of[0, 0, 1]) == -1 and int(cache.unit_of[0, 0, slot_of_1]) == 3
    fetch(1, 0)  # 1 misses (evicting 2, now the oldest), 0 hits
    assert int(cache.slot_of[0, 0, 2]) == -1
    assert cache.hit_rate() == pytest.approx(2 / 7)  # hits: 0, then 0 again; 7 lookups


def test_tables_grow_with_the_pool():
    cache = UnitCache(n_slots=2, unit_size=1)
    pool = torch.randn(1, 1, 200, 4)
    cache.reserve(pool, 10, torch.device("cpu"))
    covered = cache.units_covered
    cache.fetch(torch.tensor([[[3, 7]]]), pool, pool)
    cache.reserve(pool, 200, torch.device("cpu"))
    assert cache.units_covered >= 200 > covered
    assert cache.fetch(torch.tensor([[[7, 150]]]), pool, pool)[0, 0, 0] == cache.slot_of[0, 0, 7]
    assert cache.hit_rate() == pytest.approx(1 / 4)


def test_tiers_are_validated():
    with pytest.raises(ValidationError, match="topk"):
        MemoryConfig(topk=16, device_units=8)
    with pytest.raises(ValidationError, match="position"):
        MemoryConfig(position="contiguous", device_units=64)
    with pytest.raises(ValidationError):
        MemoryConfig(device_units=0)
    assert MemoryConfig(device_units=64).same_layout(MemoryConfig())


def _copied(state):
    """A state of its own: a state's tensors are views of the memory's buffers, taken as storage
    by the memory that loads them."""
    return {"meta": state["meta"], "tensors": {k: v.clone() for k, v in state["tensors"].items()}}


def test_a_state_moves_between_tiered_and_whole_memories():
    """A state saved from a whole memory loads into a tiered one (the layout is the same), and a
    tiered memory's state loads back; every continuation attends as the original does."""
    whole = MemoryLayer(CONFIG, PlainRope(D))
    steps = _inputs(300, 7)
    _run(whole, steps[:25])
    tiered = MemoryLayer(CONFIG.model_copy(update={"device_units": 4}), PlainRope(D))
    tiered.load_state_dict(_copied(whole.state_dict()))
    assert tiered.units.cache.hit_rate() is None  # a new, empty cache
    _run(tiered, steps[25:35])
    back = MemoryLayer(CONFIG, PlainRope(D))
    back.load_state_dict(_copied(tiered.state_dict()))
    want, _ = _run(whole, steps[25:])
    got, _ = _run(back, steps[35:])
    for a, b in zip(got, want[10:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_static_steps_reserve_the_cache_tables_and_the_host_pool():
    layer = MemoryLayer(CONFIG.model_copy(update={"device_units": 4}), PlainRope(D))
    _run(layer, _inputs(200, 7))
    assert layer.static_problem(1) is None
    layer.start_static(layer.units.n_units + 30)
    assert layer.units.cache.units_covered >= layer.units.n_units + 30
    assert layer.units.keys.capacity >= (layer.units.n_units + 30) * CONFIG.unit_size
