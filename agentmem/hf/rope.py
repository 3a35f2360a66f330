"""The model's rotary embedding, moved from before the cache to inside agentmem's attention.

`IdentityRotary` takes the decoder's rotary module's place so that the cache and the attention
function receive pre-RoPE q and k (cos=1, sin=0 is an exact identity). `ModelRope` evaluates the
original module at the positions a policy assigns, so Llama-3.1 scaling, YaRN and Gemma's per-layer
thetas come from the model itself, never from a re-derived formula.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


class IdentityRotary(nn.Module):
    """Stands in for a decoder's rotary module: returns cos=1, sin=0 of the original's shape."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        cos, sin = self.original(x, position_ids, *args, **kwargs)
        return torch.ones_like(cos), torch.zeros_like(sin)


class ModelRope:
    """cos/sin of the model's own rotary module for one layer type, at any positions."""

    def __init__(self, module: nn.Module, layer_type: str | None, max_positions: int) -> None:
        self.module = module
        self.max_positions = max_positions
        takes_layer_type = "layer_type" in inspect.signature(module.forward).parameters
        self._kwargs = {"layer_type": layer_type} if takes_layer_type and layer_type else {}

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape `positions.shape + (D,)` in `dtype`, as the model computes them."""
        like = torch.empty(0, dtype=dtype, device=positions.device)
        flat = positions.reshape(1, -1)
        cos, sin = self.module(like, flat, **self._kwargs)  # [1, N, D]
        shape = (*positions.shape, cos.shape[-1])
        return cos.reshape(shape), sin.reshape(shape)
