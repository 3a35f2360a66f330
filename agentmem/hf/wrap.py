"""`wrap` / `unwrap`: give a transformers causal LM agentmem's memory attention, and take it back.

Wrapping registers the attention and mask functions, swaps the decoder's rotary module for
`IdentityRotary` (RoPE is applied inside agentmem), and adds a forward pre-hook that routes the
cache to the attention function. `unwrap` undoes all three. No forward method is replaced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from agentmem.config import MemoryConfig
from agentmem.hf.attention import CACHE_KWARG, NAME, agentmem_attention, agentmem_mask
from agentmem.hf.cache import AgentMemCache
from agentmem.hf.rope import IdentityRotary, ModelRope
from agentmem.hf.seam import CACHE_NAMES, cache_argument
from agentmem.memory.layer import MemoryLayer
from agentmem.memory.sliding import SlidingLayer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass
class _Wrapped:
    config: MemoryConfig
    rotary: nn.Module
    attn_implementation: str
    hook: RemovableHandle
    windows: list[int | None]
    layer_types: list[str | None]
    max_positions: int
    ropes: dict[str | None, ModelRope]  # one per layer type, shared by every cache


def layer_windows(model_config) -> list[int | None]:
    """Sliding window of each layer, None where the layer attends globally."""
    n_layers = model_config.num_hidden_layers
    sliding = getattr(model_config, "sliding_window", None)
    types = getattr(model_config, "layer_types", None)
    if types:
        return [sliding if kind == "sliding_attention" else None for kind in types[:n_layers]]
    return [sliding] * n_layers


def wrap(model: nn.Module, config: MemoryConfig | None = None) -> nn.Module:
    """Give `model` agentmem's memory attention (in place); returns the model.

    Args:
        model: a transformers causal LM of a supported family (see `SUPPORTED_MODEL_TYPES`).
        config: the default memory layout of its caches; `MemoryConfig()` if omitted.
    """
    config = config or MemoryConfig()
    model_config = model.config
    if model_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"agentmem does not support model type '{model_config.model_type}'; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(model, "_agentmem", None) is not None:
        unwrap(model)
    rope_parameters = getattr(model_config, "rope_parameters", None) or {}
    rope_types = {
        params.get("rope_type") for params in rope_parameters.values() if isinstance(params, dict)
    } | {rope_parameters.get("rope_type")}
    if "dynamic" in rope_types:
        raise ValueError(
            "dynamic NTK rope scaling changes frequencies with the sequence length, which agentmem "
            "keeps inside the trained range anyway; load the model without rope scaling"
        )
    windows = layer_windows(model_config)
    if all(window is not None for window in windows):
        raise ValueError(
            "every attention layer of this model is sliding-window, so there is no global layer "
            "to give memory to; set config.sliding_window=None to make them global"
        )
    max_positions = model_config.max_position_embeddings
    _check_fits(config, max_positions)

    AttentionInterface.register(NAME, agentmem_attention)
    AttentionMaskInterface.register(NAME, agentmem_mask)
    decoder = model.get_decoder()
    rotary = decoder.rotary_emb
    attn_implementation = model_config._attn_implementation
    decoder.rotary_emb = IdentityRotary(rotary)
    model.set_attn_implementation(NAME)
    hook = decoder.register_forward_pre_hook(
        _route_cache(model, cache_argument(decoder)), with_kwargs=True
    )
    types = list(getattr(model_config, "layer_types", None) or [None] * len(windows))
    ropes = {kind: ModelRope(rotary, kind, max_positions) for kind in set(types)}
    model._agentmem = _Wrapped(
        config, rotary, attn_implementation, hook, windows, types, max_positions, ropes
    )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Restore the model `wrap` changed; returns it."""
    wrapped = _wrapped(model)
    decoder = model.get_decoder()
    wrapped.hook.remove()
    decoder.rotary_emb = wrapped.rotary
    model.set_attn_implementation(wrapped.attn_implementation)
    model._agentmem = None
    return model


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, "_agentmem", None) is not None


def new_cache(model: nn.Module, config: MemoryConfig | None = None) -> AgentMemCache:
    """A fresh, empty memory for a wrapped model (its wrap config unless `config` is given)."""
    wrapped = _wrapped(model)
    config = config or wrapped.config
    _check_fits(config, wrapped.max_positions)
    states = []
    for window, layer_type in zip(wrapped.windows, wrapped.layer_types, strict=True):
        rotary = wrapped.ropes[layer_type]
        states.append(
            MemoryLayer(config, rotary) if window is None else SlidingLayer(window, rotary)
        )
    return AgentMemCache(states, config)


def _check_fits(config: MemoryConfig, max_positions: int) -> None:
    if config.window is not None and config.window > max_positions:
        raise ValueError(
            f"the window of {config.window} keys exceeds the model's trained range of "
            f"{max_positions} positions; lower n_init, topk * unit_size or n_local"
        )


def _wrapped(model: nn.Module) -> _Wrapped:
    wrapped = getattr(model, "_agentmem", None)
    if wrapped is None:
        raise ValueError("this model is not wrapped; call agentmem.wrap(model, config) first")
    return wrapped


def _route_cache(model: nn.Module, argument: str):
    """Forward pre-hook: make sure the decoder runs on an AgentMemCache and pass it to attention.

    The cache may arrive under any of transformers' names for it (the model's own, or a deprecated
    alias); it leaves under the decoder's own name, `argument`, so no other copy shadows it.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        given = [kwargs.pop(name) for name in CACHE_NAMES if name in kwargs]
        caches = [cache for cache in given if cache is not None]
        if len(caches) > 1 and any(cache is not caches[0] for cache in caches):
            raise ValueError(
                f"two different caches were passed ({' and '.join(CACHE_NAMES)}); pass one"
            )
        cache = caches[0] if caches else new_cache(model)  # a one-off forward: a fresh memory
        if not isinstance(cache, AgentMemCache):
            raise TypeError(
                f"a wrapped model needs an AgentMemCache, got {type(cache).__name__}; "
                f"pass {argument}=agentmem.new_cache(model)"
            )
        kwargs[argument] = cache
        kwargs[CACHE_KWARG] = cache
        return args, kwargs

    return hook


@contextmanager
def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """Run a wrapped model as plain transformers inside the block, then wrap it again."""
    config = _wrapped(model).config
    unwrap(model)
    try:
        yield model
    finally:
        wrap(model, config)
