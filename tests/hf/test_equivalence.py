"""The wrapped model against the unwrapped one, for every supported family (tiny random models):
(a) a window that covers the whole sequence gives the same logits, in one step, in chunks and
token by token; (b) with every unit retrieved, memory attention equals full attention over the same
tokens at the same positions, although tokens were packed into units and re-positioned each step."""

from __future__ import annotations

import pytest
import torch

import agentmem
from agentmem.generate import decode_one_token, prefill
from agentmem.hf.seam import cache_kwargs
from tests.helpers import VOCAB, build

N_TOKENS = 150


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randint(3, VOCAB, (2, N_TOKENS))


def _reference(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _chunked(model, cache, ids, chunk):
    with torch.no_grad():
        outs = [
            model(ids[:, i : i + chunk], **cache_kwargs(model, cache)).logits
            for i in range(0, ids.shape[1], chunk)
        ]
    return torch.cat(outs, dim=1)


COVERING = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=512, exec_chunk=64)


def test_window_covering_everything_equals_the_model(family, ids):
    model = build(family)
    want = _reference(model, ids)
    agentmem.wrap(model, COVERING)
    one_shot = _chunked(model, agentmem.new_cache(model), ids, N_TOKENS)
    chunked = _chunked(model, agentmem.new_cache(model), ids, 40)
    torch.testing.assert_close(one_shot, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, want, atol=2e-5, rtol=1e-4)

    cache = agentmem.new_cache(model)
    prefill(model, cache, ids[:, :100], chunk=64)
    for t in range(100, N_TOKENS):
        logits = decode_one_token(model, cache, ids[:, t])
        torch.testing.assert_close(logits, want[:, t], atol=2e-5, rtol=1e-4)


# 150 tokens: 4 sinks, 8 units of 16 packed, <= 24 local; topk 9 retrieves every unit. Contiguous
# positions then equal the stream's own (the other policies are checked pair by pair in
# tests/memory/test_policy.py).
ALL_UNITS = agentmem.MemoryConfig(
    n_init=4, unit_size=16, topk=9, n_local=24, exec_chunk=8, position="contiguous"
)


@pytest.mark.parametrize("repr", ["attention", "mean", "minmax"])
def test_every_unit_retrieved_equals_full_attention(family, ids, repr):
    model = build(family)
    want = _reference(model, ids)
    config = ALL_UNITS.model_copy(update={"repr": repr})
    agentmem.wrap(model, config)
    cache = agentmem.new_cache(model)
    got = _chunked(model, cache, ids, 8)
    layer = cache.memory_layers[0]
    assert layer.units.n_units == 8  # tokens really were packed and retrieved
    assert layer.n_local <= 24
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_fewer_units_than_stored_changes_the_output(ids):
    """The converse: a window that leaves tokens out does not equal full attention."""
    model = build("llama")
    want = _reference(model, ids)
    agentmem.wrap(model, ALL_UNITS.model_copy(update={"topk": 2}))
    got = _chunked(model, agentmem.new_cache(model), ids, 8)
    assert (got[:, -1] - want[:, -1]).abs().max() > 1e-3


def test_transformers_generate_runs_on_the_memory(family):
    model = build(family)
    torch.manual_seed(8)
    prompt = torch.randint(3, VOCAB, (1, 40))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False)
        agentmem.wrap(model, COVERING)
        got = model.generate(
            prompt,
            max_new_tokens=12,
            do_sample=False,
            **cache_kwargs(model, agentmem.new_cache(model)),
        )
    assert torch.equal(got, want)


@pytest.mark.parametrize("position", ["contiguous", "infllm", "selfextend", "streaming"])
def test_every_position_policy_runs_on_gemma3_with_a_bounded_window(position):
    model = build("gemma3")
    torch.manual_seed(9)
    ids = torch.randint(3, VOCAB, (1, 300))
    topk = 0 if position == "streaming" else 2
    config = agentmem.MemoryConfig(
        n_init=4,
        unit_size=16,
        topk=topk,
        n_local=48,
        exec_chunk=16,
        position=position,
        selfextend_window=16,
        selfextend_group=4,
    )
    agentmem.wrap(model, config)
    cache = agentmem.new_cache(model)
    logits = _chunked(model, cache, ids, 16)
    assert torch.isfinite(logits).all()
    layer = cache.memory_layers[0]
    assert layer.n_sinks + layer.n_local + (layer.units.n_units * 16) + layer.dropped == 300
