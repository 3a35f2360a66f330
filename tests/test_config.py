"""MemoryConfig: defaults, presets, and errors that say what to change."""

from __future__ import annotations

import pydantic
import pytest

from agentmem import PRESETS, MemoryConfig


def test_defaults_attend_at_most_2048_keys():
    config = MemoryConfig()
    assert config.window == 64 + 8 * 128 + 960 == 2048
    assert config.retrieves


def test_streaming_and_full_windows():
    assert MemoryConfig(position="streaming", topk=0, n_local=1000).window == 64 + 1000
    assert MemoryConfig(position="full", topk=0).window is None


def test_config_is_frozen_and_rejects_unknown_fields():
    config = MemoryConfig()
    with pytest.raises(pydantic.ValidationError):
        config.topk = 3
    with pytest.raises(pydantic.ValidationError, match="n_locl"):
        MemoryConfig(n_locl=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"repr_topk": 200}, "lower repr_topk"),
        ({"repr": "mean", "repr_topk": 3}, "divisible by repr_topk"),
        ({"topk": 0}, "position='streaming'"),
        ({"exec_chunk": 960}, "lower exec_chunk or raise n_local"),
        ({"position": "selfextend", "selfextend_window": 100}, "multiple of"),
        ({"unit_size": 0}, "greater than 0"),
        ({"position": "sideways"}, "contiguous"),
        ({"retrieve_every": 0}, "greater than 0"),
    ],
)
def test_impossible_combinations_say_what_to_change(fields, message):
    with pytest.raises(ValueError, match=message):
        MemoryConfig(**fields)


def test_presets_are_valid_and_overridable():
    assert set(PRESETS) >= {"default", "4k", "infllm-paper", "contiguous", "streaming", "full"}
    config = MemoryConfig.preset("4k", topk=4)
    assert config.topk == 4 and config.n_local == PRESETS["4k"].n_local
    with pytest.raises(ValueError, match="unknown preset"):
        MemoryConfig.preset("huge")
    with pytest.raises(ValueError, match="lower exec_chunk"):
        MemoryConfig.preset("default", n_local=100)


def test_how_often_decoding_retrieves_is_not_part_of_the_layout():
    """A memory read with one `retrieve_every` can be decoded with another."""
    assert MemoryConfig(retrieve_every=4).same_layout(MemoryConfig())
    assert not MemoryConfig(retrieve_every=4).same_layout(MemoryConfig(unit_size=32))
