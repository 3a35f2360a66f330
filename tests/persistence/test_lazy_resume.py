"""Lazy resume: a stored session opens with its unit keys and values still in their files, reads
a unit when a step first retrieves it, verifies what it reads, and continues token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import agentmem
from agentmem.persistence import CorruptPayload, integrity
from agentmem.session import LanguageModel
from tests.helpers import build, char_tokenizer

SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)
TEXT = "The code is 4721. " + "The quick brown fox jumps over the lazy dog. " * 12


@pytest.fixture
def lm() -> LanguageModel:
    return LanguageModel(build("gemma3"), char_tokenizer(), SMALL)


@pytest.fixture
def small_blocks(monkeypatch):
    """Check the tiny model's unit tensors by blocks, as a real model's are."""
    monkeypatch.setattr(integrity, "LARGE", 1024)
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 256)


def _memory_layers(session):
    return session.cache.memory_layers


def _flip(path: Path, pick) -> None:
    """Flip one bit in the middle of the first tensor (by name) of the payload that `pick` takes."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    offsets = json.loads(bytes(data[8:header]))
    name = sorted(n for n in offsets if n != "__metadata__" and pick(n))[0]
    begin, end = offsets[name]["data_offsets"]
    data[header + (begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_resume_reads_no_unit_until_a_step_retrieves_it(lm, store, open_store, small_blocks):
    saved = lm.session("s", store=store)
    saved.append(TEXT)
    want = lm.session()
    want.append(TEXT)
    resumed = lm.session("s", store=open_store())
    layers = _memory_layers(resumed)
    n_units = [layer.units.n_units for layer in layers]
    assert min(n_units) > SMALL.topk  # retrieval has a choice to make
    assert [layer.units.lazy_units for layer in layers] == n_units
    # The first token comes from the saved logits; the second takes one step, which retrieves.
    assert resumed.generate(max_new_tokens=2) == want.generate(max_new_tokens=2)
    for layer, units in zip(layers, n_units, strict=True):
        retrieved = set(layer.last_ids.flatten().tolist())
        assert units - layer.units.lazy_units == len(retrieved) < units
    assert resumed.generate(max_new_tokens=16) == want.generate(max_new_tokens=16)


def test_a_lazily_resumed_session_saves_only_what_is_new_and_resumes_again(lm, store, open_store):
    saved = lm.session("s", store=store)
    saved.append(TEXT)
    want = lm.session()
    want.append(TEXT)
    resumed = lm.session("s", store=open_store())
    resumed.append("One more turn: " + TEXT[:80])
    want.append("One more turn: " + TEXT[:80])
    again = lm.session("s", store=open_store())
    assert again.tokens == want.tokens
    assert again.generate(max_new_tokens=12) == want.generate(max_new_tokens=12)
    # A full state reads every unit first: the same tensors as the uninterrupted session's.
    full = again.state_dict()["tensors"]
    reference = want.state_dict()["tensors"]
    assert full.keys() == reference.keys()
    assert all(torch.equal(full[name], reference[name]) for name in full)


def test_damage_in_a_unit_is_found_when_the_unit_is_read(lm, store, open_store, small_blocks):
    saved = lm.session("s", store=store)
    saved.append(TEXT)
    path = store.segment_path(store.segments("s")[-1])
    _flip(path, lambda name: name.endswith(".unit_k"))
    resumed = lm.session("s", store=open_store())  # opens: the units were not read
    layer = next(layer for layer in _memory_layers(resumed) if layer.units.lazy_units)
    with pytest.raises(CorruptPayload, match=str(path)):
        layer.units.materialize()


def test_damage_outside_the_units_is_found_on_open(lm, store, open_store):
    saved = lm.session("s", store=store)
    saved.append(TEXT)
    path = store.segment_path(store.segments("s")[-1])
    _flip(path, lambda name: name.endswith(".local_k"))
    with pytest.raises(CorruptPayload, match=str(path)):
        lm.session("s", store=open_store())


def test_a_session_resumes_lazily_into_kv_tiers(lm, store, open_store):
    """Opened with device_units, a stored session keeps its layout, reads its units from their
    files into the host pool as steps retrieve them, attends through the device cache, and
    continues token for token; saved again, it resumes without tiers as well."""
    saved = lm.session("s", store=store)
    saved.append(TEXT)
    want = lm.session()
    want.append(TEXT)
    tiered = SMALL.model_copy(update={"device_units": SMALL.topk})
    resumed = lm.session("s", store=open_store(), memory=tiered)
    layers = _memory_layers(resumed)
    assert all(layer.units.lazy_units == layer.units.n_units > 0 for layer in layers)
    assert resumed.generate(max_new_tokens=16) == want.generate(max_new_tokens=16)
    for layer in layers:
        assert 0 < layer.units.lazy_units < layer.units.n_units  # read as retrieved
        assert layer.units.cache.hit_rate() is not None
    resumed.append("One more turn: " + TEXT[:80])
    want.append("One more turn: " + TEXT[:80])
    again = lm.session("s", store=open_store())
    assert again.memory.device_units is None
    assert again.generate(max_new_tokens=12) == want.generate(max_new_tokens=12)
