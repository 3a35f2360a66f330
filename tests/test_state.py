"""`state_dict` / `load_state_dict`, the one way in and out of a memory: a session loaded from
another's state (through a safetensors file) continues token for token as the original does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import agentmem
from agentmem.memory.layer import MemoryLayer
from agentmem.session import LanguageModel
from tests.helpers import PlainRope, build

TEXT = "The quick brown fox jumps over the lazy dog. " * 6
SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)


def _through_a_file(state: dict, path) -> dict:
    """What a store does with a state: tensors into safetensors, meta into JSON, and back."""
    save_file({name: t.contiguous() for name, t in state["tensors"].items()}, str(path))
    return {"meta": json.loads(json.dumps(state["meta"])), "tensors": load_file(str(path))}


@pytest.mark.parametrize("family", ["gemma3", "llama"])  # sliding + memory layers; memory only
@pytest.mark.parametrize("position", ["infllm", "contiguous"])
def test_a_loaded_session_continues_token_for_token(tokenizer, tmp_path, family, position):
    lm = LanguageModel(build(family), tokenizer, SMALL.model_copy(update={"position": position}))
    original = lm.session()
    original.append(TEXT)
    list(original.generate_tokens(3))  # a generated token pending, not yet fed
    assert original.cache.memory_layers[0].units.n_units > SMALL.topk  # a real memory
    resumed = lm.session()
    resumed.load_state_dict(_through_a_file(original.state_dict(), tmp_path / "s.safetensors"))
    assert resumed.tokens == original.tokens and len(resumed) == len(original)
    assert resumed.recalled() == original.recalled()  # provenance of the last step survives
    assert list(resumed.generate_tokens(12)) == list(original.generate_tokens(12))
    resumed.append("Again.")
    original.append("Again.")
    assert resumed.generate(8) == original.generate(8)
    for a, b in zip(resumed.cache.memory_layers, original.cache.memory_layers, strict=True):
        assert (a.seen, a.units.n_units, a.n_sinks) == (b.seen, b.units.n_units, b.n_sinks)


def test_a_state_without_its_first_units_joins_with_the_earlier_save(tokenizer):
    lm = LanguageModel(build("llama"), tokenizer, SMALL)
    session = lm.session()
    session.append(TEXT[:100])
    first = session.cache.memory_layers[0].units.n_units
    session.append(TEXT[100:])
    layer = session.cache.memory_layers[0]
    whole = layer.state_dict()["tensors"]
    later = layer.state_dict(units_from=first)
    assert later["meta"]["units_from"] == first and layer.units.n_units > first
    rows = first * SMALL.unit_size
    torch.testing.assert_close(later["tensors"]["unit_k"], whole["unit_k"][:, :, rows:])
    torch.testing.assert_close(later["tensors"]["reps"], whole["reps"][:, :, first:])
    with pytest.raises(ValueError, match="join the saves"):
        MemoryLayer(SMALL, layer.rotary).load_state_dict(later)


def test_a_state_saved_before_the_query_window_loads_and_continues(tokenizer):
    """States written before `query_window` existed name no such field and hold no latest
    queries: they load under the field's default, with zeros for the queries (which change no
    choice), and continue as a session that never kept any."""
    lm = LanguageModel(build("llama"), tokenizer, SMALL)
    session = lm.session()
    session.append(TEXT)
    old = session.state_dict()
    for meta in [old["meta"], *old["meta"]["layers"]]:
        meta.get("memory", {}).pop("query_window", None)
    old["tensors"] = {n: t for n, t in old["tensors"].items() if not n.endswith("recent_q")}
    resumed = lm.session()
    resumed.load_state_dict(old)
    assert all(layer.recent_q is None for layer in resumed.cache.memory_layers)
    fresh = lm.session()  # the same memory with its latest queries forgotten
    fresh.load_state_dict(session.state_dict())
    for layer in fresh.cache.memory_layers:
        layer.recent_q = None
    assert list(resumed.generate_tokens(8)) == list(fresh.generate_tokens(8))


def test_another_memory_layout_is_refused_naming_both():
    layer = MemoryLayer(SMALL, PlainRope(16))
    other = MemoryLayer(SMALL.model_copy(update={"topk": 3}), PlainRope(16))
    with pytest.raises(ValueError, match="'topk': 2.*'topk': 3"):
        other.load_state_dict(layer.state_dict())


def test_a_cache_of_another_model_is_refused(tokenizer):
    gemma = LanguageModel(build("gemma3"), tokenizer, SMALL).session()
    gemma.append(TEXT)
    llama = LanguageModel(build("llama"), tokenizer, SMALL).session()
    with pytest.raises(ValueError, match="layers"):
        llama.load_state_dict(gemma.state_dict())


def test_no_state_in_the_middle_of_a_captured_step():
    layer = MemoryLayer(SMALL, PlainRope(16))
    layer.static_armed = True
    with pytest.raises(RuntimeError, match="captured step"):
        layer.state_dict()


def test_a_session_state_without_its_first_tokens_is_refused(tokenizer):
    lm = LanguageModel(build("llama"), tokenizer, SMALL)
    session = lm.session()
    session.append(TEXT)
    later = session.state_dict(tokens_from=10)
    assert later["tensors"]["session.tokens"].tolist() == session.tokens[10:]
    with pytest.raises(ValueError, match="first tokens"):
        lm.session().load_state_dict(later)
