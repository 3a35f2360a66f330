"""agentmem: an unbounded, persistent KV memory with a finite attention window for HF causal LMs."""

from agentmem.config import PRESETS, MemoryConfig
from agentmem.hf.cache import AgentMemCache
from agentmem.hf.wrap import (
    SUPPORTED_MODEL_TYPES,
    is_wrapped,
    new_cache,
    unwrap,
    unwrapped,
    wrap,
)

__all__ = [
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "AgentMemCache",
    "MemoryConfig",
    "is_wrapped",
    "new_cache",
    "unwrap",
    "unwrapped",
    "wrap",
]
