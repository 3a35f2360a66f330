"""How transformers names the cache at the seam, read off the model rather than off a version.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name stays a
deprecated alias until 5.40) and the output field with it. agentmem asks the module it calls which
name its `forward` takes, so every release in the supported range is driven the same way.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

# The names a forward may give its cache argument, the current one first.
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(module: nn.Module) -> str:
    """The name under which `module.forward` takes its cache ("cache" or "past_key_values")."""
    return _cache_argument(type(module))


def cache_kwargs(module: nn.Module, cache) -> dict:
    """`{name: cache}` to call `module` with, under the name its forward takes."""
    return {cache_argument(module): cache}


@functools.cache  # per class: a signature is read once, not at every decoded token
def _cache_argument(cls: type) -> str:
    parameters = inspect.signature(cls.forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise TypeError(
        f"{cls.__name__}.forward takes no cache argument (neither "
        f"{' nor '.join(CACHE_NAMES)}), so agentmem cannot give it a memory"
    )


def output_cache(output):
    """The cache a model returned in its output (under whichever name this release uses)."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None
