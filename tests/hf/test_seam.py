"""The cache reaches agentmem's attention whatever transformers calls it.

transformers 5.24 renamed the forward argument `past_key_values` to `cache`; agentmem's hook had
looked for the old name only, so it built a second, empty memory beside the caller's and every
model call failed. These tests pin the rule: the name comes from the model, either name routes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import agentmem
from agentmem.hf.attention import CACHE_KWARG
from agentmem.hf.seam import CACHE_NAMES, cache_argument, cache_kwargs, output_cache
from agentmem.hf.wrap import _route_cache
from tests.helpers import VOCAB, build


def test_the_callers_cache_is_the_one_that_fills(family):
    model = agentmem.wrap(build(family))
    cache = agentmem.new_cache(model)
    with torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 20)), **cache_kwargs(model, cache))
        model(torch.randint(3, VOCAB, (1, 5)), **cache_kwargs(model, cache))
    assert output_cache(out) is cache
    assert cache.get_seq_length() == 25


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_the_decoder_takes_the_cache_under_either_name(name):
    """Both names reach the decoder in some release (the model's own, or a deprecated alias)."""
    model = agentmem.wrap(build("qwen2"))
    cache = agentmem.new_cache(model)
    with torch.no_grad():
        model.get_decoder()(input_ids=torch.randint(3, VOCAB, (1, 7)), **{name: cache})
    assert cache.get_seq_length() == 7


class _Decoder(nn.Module):
    def forward(self, input_ids, cache=None, **kwargs): ...


@pytest.mark.parametrize("given", CACHE_NAMES)
def test_the_hook_moves_the_cache_to_the_decoders_own_name(given):
    """The rule, independent of the installed release: a decoder whose forward takes `cache`."""
    model = agentmem.wrap(build("llama"))
    cache = agentmem.new_cache(model)
    argument = cache_argument(_Decoder())
    assert argument == "cache"
    _, kwargs = _route_cache(model, argument)(_Decoder(), (), {given: cache, "use_cache": True})
    assert kwargs["cache"] is cache and kwargs[CACHE_KWARG] is cache
    assert "past_key_values" not in kwargs and kwargs["use_cache"] is True


def test_an_unset_cache_argument_gets_a_fresh_memory():
    model = agentmem.wrap(build("llama"))
    _, kwargs = _route_cache(model, "cache")(_Decoder(), (), {"cache": None})
    assert (
        isinstance(kwargs["cache"], agentmem.AgentMemCache)
        and kwargs["cache"].get_seq_length() == 0
    )


def test_two_different_caches_are_refused():
    model = agentmem.wrap(build("llama"))
    hook = _route_cache(model, "cache")
    twins = {"cache": agentmem.new_cache(model), "past_key_values": agentmem.new_cache(model)}
    with pytest.raises(ValueError, match="two different caches"):
        hook(_Decoder(), (), twins)


def test_a_module_without_a_cache_argument_is_refused():
    with pytest.raises(TypeError, match="takes no cache argument"):
        cache_argument(nn.Linear(2, 2))
