"""infllm and stacked steps read sinks, units and local window in place (`memory_attention`); the
other policies assemble the window and place it (`placements` + `placed_attention`). Once sinks
and units exist, both ways give the same attention, mass and retrieval, step after step."""

from __future__ import annotations

import pytest
import torch

import agentmem
import agentmem.memory.layer as memory_layer
from agentmem.config import MemoryConfig
from agentmem.hf.seam import cache_kwargs
from agentmem.memory.layer import MemoryLayer
from tests.helpers import VOCAB, PlainRope, build

D = 16
CONFIG = MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=32, exec_chunk=16)
N_TOKENS = 224  # 4 sinks, 12 units packed, 28 local: retrieval chooses 2 of up to 12 units


class AssembledLayer(MemoryLayer):
    """The same layer with the window assembled first, as for contiguous and selfextend."""

    reads_in_place = False


@pytest.fixture
def paths(monkeypatch) -> list[str]:
    """Which attention each step took: 'in place' or 'assembled'."""
    taken = []
    real_in_place, real_attend = memory_layer.memory_attention, memory_layer.attend

    def in_place(q, **kwargs):
        taken.append("in place")
        return real_in_place(q, **kwargs)

    def assembled(q, window, **kwargs):
        taken.append("assembled")
        return real_attend(q, window, **kwargs)

    monkeypatch.setattr(memory_layer, "memory_attention", in_place)
    monkeypatch.setattr(memory_layer, "attend", assembled)
    return taken


@pytest.mark.parametrize("repr", ["attention", "mean"])
@pytest.mark.parametrize("position", ["infllm", "stacked"])
def test_in_place_equals_the_assembled_window_step_by_step(paths, position, repr):
    config = CONFIG.model_copy(update={"position": position, "repr": repr})
    layers = {
        "in place": MemoryLayer(config, PlainRope(D)),
        "assembled": AssembledLayer(config, PlainRope(D)),
    }
    torch.manual_seed(0)
    keys, values = torch.randn(2, 1, 2, N_TOKENS, D).unbind(0)
    steps = [16] * 13 + [1] * 16  # prefill chunks, then decoding
    first = 0
    for step in steps:
        piece = slice(first, first + step)
        q = torch.randn(1, 4, step, D)
        outs = {}
        for name, layer in layers.items():
            paths.clear()
            layer.store(keys[:, :, piece], values[:, :, piece])
            outs[name] = layer.attend(q, scale=D**-0.5)
            assert paths == [name]
        first += step
        in_place, assembled = layers["in place"], layers["assembled"]
        torch.testing.assert_close(outs["in place"], outs["assembled"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(in_place.local_mass, assembled.local_mass)
        if in_place.last_ids is None:
            assert assembled.last_ids is None
        else:
            # the same units; read in place, in any order
            assert torch.equal(in_place.last_ids.sort(-1).values, assembled.last_ids)
    assert first == N_TOKENS
    # The case the covering equivalence tests never reach: sinks and units, and a real choice.
    layer = layers["in place"]
    assert layer.n_sinks == 4 and layer.units.n_units == 12 > config.topk
    assert layer.last_ids.shape == (1, 2, 2)
    torch.testing.assert_close(layer.units.reps.data, layers["assembled"].units.reps.data)


@pytest.mark.parametrize("position", ["infllm", "stacked"])
def test_in_place_and_assembled_give_the_same_logits_in_a_model(paths, monkeypatch, position):
    model = build("llama")
    config = CONFIG.model_copy(update={"position": position})
    agentmem.wrap(model, config)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, N_TOKENS))
    logits = {}
    for name in ("in place", "assembled"):
        if name == "assembled":
            monkeypatch.setattr(MemoryLayer, "reads_in_place", False)
        paths.clear()
        cache = agentmem.new_cache(model)
        with torch.no_grad():
            logits[name] = torch.cat(
                [
                    model(ids[:, i : i + 16], **cache_kwargs(model, cache)).logits
                    for i in range(0, N_TOKENS, 16)
                ],
                dim=1,
            )
        assert paths == [name] * (2 * N_TOKENS // 16)  # two global layers, every step
        layer = cache.memory_layers[0]
        assert layer.n_sinks == 4 and layer.units.n_units == 12
    torch.testing.assert_close(logits["in place"], logits["assembled"], atol=1e-4, rtol=1e-4)
