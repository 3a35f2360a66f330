"""agentmem: an unbounded, persistent KV memory with a finite attention window for HF causal LMs."""

from agentmem import models
from agentmem.config import POSITIONS, PRESETS, MemoryConfig
from agentmem.generate import Sampling, decode_one_token, greedy, prefill, sampling
from agentmem.hf.cache import AgentMemCache
from agentmem.hf.wrap import (
    SUPPORTED_MODEL_TYPES,
    is_wrapped,
    new_cache,
    unwrap,
    unwrapped,
    wrap,
)
from agentmem.models import BUILTIN_MODELS, load
from agentmem.persistence import Store
from agentmem.persistent import PersistentSession
from agentmem.session import LanguageModel, Recall, Session

__all__ = [
    "BUILTIN_MODELS",
    "POSITIONS",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "AgentMemCache",
    "LanguageModel",
    "MemoryConfig",
    "PersistentSession",
    "Recall",
    "Sampling",
    "Session",
    "Store",
    "decode_one_token",
    "greedy",
    "is_wrapped",
    "load",
    "models",
    "new_cache",
    "prefill",
    "sampling",
    "unwrap",
    "unwrapped",
    "wrap",
]
