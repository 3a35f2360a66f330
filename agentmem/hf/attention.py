"""The attention function and mask function agentmem registers with transformers.

Each attention module computes q, k, v (RoPE left to us), the cache's `update` hands k, v to the
layer's state, and `agentmem_attention` runs that state's step. The mask function returns no mask:
every state builds its own from the stream indices it tracks.
"""

from __future__ import annotations

import torch
from torch import nn

from agentmem.hf.cache import AgentMemCache

NAME = "agentmem"
CACHE_KWARG = "agentmem_cache"


def agentmem_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D] pre-RoPE -> output [B, T, Hq, D], as transformers expects."""
    cache = kwargs.get(CACHE_KWARG)
    if not isinstance(cache, AgentMemCache):
        raise RuntimeError(
            "agentmem attention ran without an AgentMemCache; call the model through "
            "agentmem.wrap(model) and pass it the cache of agentmem.new_cache(model)"
        )
    state = cache.state(module.layer_idx)
    expected_window = getattr(state, "window", None)
    if kwargs.get("sliding_window") != expected_window:
        raise RuntimeError(
            f"layer {module.layer_idx}: the model attends with sliding_window="
            f"{kwargs.get('sliding_window')} but the cache was built for {expected_window}"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = state.attend(query, scale)  # [B, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


def agentmem_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """No mask is needed; padded batches are refused here, where they enter."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "agentmem does not support padded batches: every sequence of a batch must have the "
            "same length (use one session per conversation)"
        )
    return None
