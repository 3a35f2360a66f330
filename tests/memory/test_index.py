"""index="faiss": the HNSW graphs follow the memory, their candidates are scored exactly, and a
layer retrieves through them what the exact scan finds where the answer is clear."""

from __future__ import annotations

import json

import pytest
import torch

import agentmem.memory.index as unit_index
from agentmem.config import MemoryConfig
from agentmem.memory.index import UnitIndex, indexed_top_units
from agentmem.memory.layer import MemoryLayer
from agentmem_kernels import score_units
from tests.helpers import PlainRope

D = 16
CONFIG = MemoryConfig(
    n_init=4, n_local=40, unit_size=8, topk=3, repr_topk=2, exec_chunk=16, index="faiss",
    index_min_units=8,
)  # fmt: skip


def _reps(n_units, batch=1, heads=2, per_unit=2, seed=0):
    seeded = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n_units, per_unit, D, generator=seeded)


def test_the_graphs_take_each_new_unit_once_and_start_afresh_for_a_smaller_memory():
    index, reps = UnitIndex(), _reps(30, batch=2)
    index.sync(reps[:, :, :10])
    index.sync(reps)
    index.sync(reps)
    assert index.n_units == 30
    assert [g.ntotal for g in index.graphs] == [60] * 4  # (batch, key head) each, 2 per unit
    index.sync(reps[:, :, :5])  # another memory (a state loaded, a shorter branch)
    assert index.n_units == 5 and [g.ntotal for g in index.graphs] == [10] * 4


def test_candidates_that_cover_every_unit_give_exactly_the_exact_top_k(monkeypatch):
    # Each query's search returns every representative and every unit is kept: the re-score is
    # then the exact scan itself, softmax over the same units included.
    monkeypatch.setattr(unit_index, "HITS_PER_QUERY", 1000)
    monkeypatch.setattr(unit_index, "CANDIDATES_PER_UNIT_KEPT", 1000)
    reps = _reps(40, batch=2)
    q = torch.randn(2, 4, 5, D)
    found = indexed_top_units(UnitIndex(), q, reps, k=6, kind="dot", scale=D**-0.5)
    assert torch.equal(found, score_units(q, reps, kind="dot", scale=D**-0.5, k=6))


def test_planted_units_are_found_among_many_and_the_ids_are_ascending():
    reps = _reps(2000, heads=1, seed=1) * 0.1
    q = torch.randn(1, 2, 7, D)
    planted = [17, 900, 1999]
    for unit in planted:  # a unit whose first representative lines up with the queries
        reps[0, 0, unit, 0] = q[0].mean(dim=(0, 1)) * 3
    found = indexed_top_units(UnitIndex(), q, reps, k=3, kind="dot", scale=D**-0.5)
    assert found[0, 0].tolist() == planted
    assert torch.equal(found, score_units(q, reps, kind="dot", scale=D**-0.5, k=3))


def test_too_few_hits_are_made_up_by_the_latest_units(monkeypatch):
    monkeypatch.setattr(unit_index, "HITS_PER_QUERY", 1)
    monkeypatch.setattr(unit_index, "SEARCH_QUERIES", 1)
    reps = _reps(50, heads=1)
    q = torch.randn(1, 1, 1, D)
    found = indexed_top_units(UnitIndex(), q, reps, k=4, kind="dot", scale=1.0)
    assert found.shape == (1, 1, 4) and len(set(found[0, 0].tolist())) == 4
    assert len(set(found[0, 0].tolist()) & {46, 47, 48, 49}) >= 3  # one hit, the rest the latest


def _stream(layer, keys, values, step, seed=0):
    torch.manual_seed(seed)
    outs = []
    for first in range(0, keys.shape[2], step):
        piece = slice(first, first + step)
        layer.store(keys[:, :, piece], values[:, :, piece])
        outs.append(layer.attend(torch.randn(1, 4, keys[:, :, piece].shape[2], D), scale=D**-0.5))
    return torch.cat(outs, dim=2)


def test_a_layer_under_the_index_steps_as_the_exact_one_when_the_index_proposes_every_unit(
    monkeypatch,
):
    monkeypatch.setattr(unit_index, "HITS_PER_QUERY", 10_000)
    monkeypatch.setattr(unit_index, "CANDIDATES_PER_UNIT_KEPT", 10_000)
    keys, values = torch.randn(1, 2, 400, D), torch.randn(1, 2, 400, D)
    exact = MemoryLayer(CONFIG.model_copy(update={"index": "exact"}), PlainRope(D))
    faiss_layer = MemoryLayer(CONFIG, PlainRope(D))
    for step in (16, 1):
        torch.testing.assert_close(
            _stream(faiss_layer, keys, values, step), _stream(exact, keys, values, step)
        )
    assert faiss_layer.index.n_units == faiss_layer.units.n_units > CONFIG.index_min_units


def test_below_index_min_units_the_index_is_not_built():
    layer = MemoryLayer(CONFIG.model_copy(update={"index_min_units": 10_000}), PlainRope(D))
    _stream(layer, torch.randn(1, 2, 300, D), torch.randn(1, 2, 300, D), 16)
    assert layer.units.n_units > CONFIG.topk and layer.index.n_units == 0


def test_a_state_made_under_exact_loads_into_a_faiss_layer_and_its_graphs_are_rebuilt():
    keys, values = torch.randn(1, 2, 300, D), torch.randn(1, 2, 300, D)
    exact = MemoryLayer(CONFIG.model_copy(update={"index": "exact"}), PlainRope(D))
    _stream(exact, keys, values, 16)
    layer = MemoryLayer(CONFIG, PlainRope(D))
    layer.load_state_dict(exact.state_dict())
    assert layer.index.n_units == 0
    _stream(layer, keys[:, :, :16], values[:, :, :16], 16)
    assert layer.index.n_units == layer.units.n_units
    other = MemoryLayer(CONFIG.model_copy(update={"unit_size": 4}), PlainRope(D))
    with pytest.raises(ValueError, match="memory layout"):
        other.load_state_dict(exact.state_dict())


def test_the_config_names_what_the_index_cannot_do():
    with pytest.raises(ValueError, match="minmax"):
        MemoryConfig(index="faiss", repr="minmax")
    assert MemoryConfig(index="faiss").same_layout(MemoryConfig())
    assert not MemoryConfig(index="faiss").same_layout(MemoryConfig(topk=4))
    layer = MemoryLayer(CONFIG, PlainRope(D))
    _stream(layer, torch.randn(1, 2, 300, D), torch.randn(1, 2, 300, D), 16)
    assert "faiss" in layer.static_problem(1)


def test_the_step_benchmark_finds_the_planted_unit_both_ways_and_writes_its_rows(tmp_path):
    from benchmarks import index_steps

    memory = MemoryConfig(topk=4, query_window=8, exec_chunk=64, n_local=128)
    row = index_steps.measure(256, dim=32, per_unit=2, memory=memory, repeats=1)
    assert row["units"] == 256 and row["build_s_per_unit"] > 0
    for kind, queries in (("decode", 8), ("prefill", 64)):
        step = row[kind]
        assert step["queries"] == queries and step["exact_s"] > 0 and step["faiss_s"] > 0
        assert step["planted_exact"] and step["planted_faiss"]
        assert 0 < step["recall_at_k"] <= 1
    out = tmp_path / "steps.json"
    assert index_steps.main(["--units", "128", "--repeats", "1", "--out", str(out)]) == 0
    assert [r["units"] for r in json.loads(out.read_text())["rows"]] == [128]
