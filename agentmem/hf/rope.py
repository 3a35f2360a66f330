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
    """cos/sin of the model's own rotary module for one layer type, looked up in a table that
    grows on demand (positions are re-assigned every step, so rows are reused across steps)."""

    def __init__(self, module: nn.Module, layer_type: str | None, max_positions: int) -> None:
        self.module = module
        self.max_positions = max_positions
        takes_layer_type = "layer_type" in inspect.signature(module.forward).parameters
        self._kwargs = {"layer_type": layer_type} if takes_layer_type and layer_type else {}
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []  # smaller, replaced tables

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, limit: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape `positions.shape + (D,)` in `dtype`, as the model computes them.

        `limit` bounds the positions from above (a number the caller knows, so no device sync).
        """
        cos, sin = self.table(limit, dtype, positions.device)
        return cos[positions], sin[positions]

    def table(
        self, limit: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D] for positions 0..N-1, N >= limit (grown by doubling, cached)."""
        key = (dtype, device)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < limit:
            size = max(limit, 1024, 2 * (0 if table is None else table[0].shape[0]))
            like = torch.empty(0, dtype=dtype, device=device)
            positions = torch.arange(size, device=device)[None]
            cos, sin = self.module(like, positions, **self._kwargs)  # [1, size, D]
            if key in self._tables:  # a captured CUDA graph may still read the old one
                self._retired.append(self._tables[key])
            table = self._tables[key] = (cos[0], sin[0])
        return table
