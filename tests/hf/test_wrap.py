"""wrap / unwrap and the errors raised where bad input enters."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
)

import agentmem
from agentmem.hf.rope import IdentityRotary
from agentmem.hf.seam import cache_kwargs, output_cache
from tests.helpers import COMMON, VOCAB, build


def test_unwrap_restores_the_model():
    model = build("gemma3")
    ids = torch.randint(3, VOCAB, (1, 30))
    with torch.no_grad():
        before = model(ids).logits
        rotary = model.model.rotary_emb
        implementation = model.config._attn_implementation
        agentmem.wrap(model)
        assert isinstance(model.model.rotary_emb, IdentityRotary)
        assert agentmem.is_wrapped(model)
        agentmem.unwrap(model)
        assert model.model.rotary_emb is rotary
        assert model.config._attn_implementation == implementation
        assert not agentmem.is_wrapped(model)
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
        assert not model._forward_pre_hooks and not model.model._forward_pre_hooks


def test_wrapping_twice_rewraps_with_the_new_config():
    model = build("llama")
    agentmem.wrap(model, agentmem.MemoryConfig(topk=2))
    agentmem.wrap(model, agentmem.MemoryConfig(topk=3))
    assert agentmem.new_cache(model).config.topk == 3
    agentmem.unwrap(model)
    assert not isinstance(model.model.rotary_emb, IdentityRotary)


def test_a_plain_forward_gets_a_fresh_memory():
    model = build("qwen3")
    agentmem.wrap(model)
    with torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 20)))
    assert isinstance(output_cache(out), agentmem.AgentMemCache)
    assert output_cache(out).get_seq_length() == 20


def test_unsupported_architecture_lists_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        agentmem.wrap(model)


def test_a_model_with_only_sliding_layers_is_refused():
    model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=32))
    with pytest.raises(ValueError, match="sliding_window=None"):
        agentmem.wrap(model)


def test_a_window_beyond_the_trained_range_is_refused():
    model = build("llama")  # 8192 positions
    with pytest.raises(ValueError, match="trained range"):
        agentmem.wrap(model, agentmem.MemoryConfig(n_local=8192, topk=1))
    agentmem.wrap(model)
    with pytest.raises(ValueError, match="trained range"):
        agentmem.new_cache(model, agentmem.MemoryConfig(n_local=9000))


def test_another_cache_type_is_refused():
    model = build("mistral")
    agentmem.wrap(model)
    with pytest.raises(TypeError, match="AgentMemCache"):
        model(
            torch.randint(3, VOCAB, (1, 5)),
            **cache_kwargs(model, DynamicCache(config=model.config)),
        )


def test_padded_batches_are_refused():
    model = build("llama")
    agentmem.wrap(model)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="padded batches"):
        model(torch.randint(3, VOCAB, (2, 6)), attention_mask=mask)


def test_unwrap_of_a_plain_model_says_what_to_do():
    with pytest.raises(ValueError, match="agentmem.wrap"):
        agentmem.unwrap(build("llama"))


def test_a_reset_cache_is_an_empty_memory_again():
    model = agentmem.wrap(build("gemma3"))  # memory and sliding layers
    ids = torch.randint(3, VOCAB, (1, 40))
    cache = agentmem.new_cache(model)
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 30)), **cache_kwargs(model, cache))
        cache.reset()
        assert cache.get_seq_length() == 0
        got = model(ids, **cache_kwargs(model, cache)).logits
        want = model(ids, **cache_kwargs(model, agentmem.new_cache(model))).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("operation", "match"),
    [
        (lambda cache: cache.layers[0].offload(), "tiers"),
        (lambda cache: cache.layers[0].prefetch(), "tiers"),
        (lambda cache: cache.crop(3), "append-only"),
        (lambda cache: cache.batch_repeat_interleave(2), "one stream"),
        (lambda cache: cache.batch_select_indices(torch.tensor([0])), "one stream"),
    ],
)
def test_operations_the_memory_cannot_do_say_so(operation, match):
    cache = agentmem.new_cache(agentmem.wrap(build("llama")))
    with pytest.raises(NotImplementedError, match=match):
        operation(cache)
