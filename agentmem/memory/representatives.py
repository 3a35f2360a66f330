"""Representative keys of a memory unit: the few vectors a step's queries are scored against.

`attention` keeps the `r` keys that received most attention while they sat in the local window
(InfLLM); `mean` the means of `r` equal slices; `minmax` per-slice bounding boxes (Quest), stored as
`r` mins then `r` maxes. All work on pre-RoPE keys, so scores do not depend on where a unit sits.
"""

from __future__ import annotations

import torch

from agentmem.config import Representative


def score_kind(kind: Representative) -> str:
    """How the kernels score this kind of representative."""
    return "minmax" if kind == "minmax" else "dot"


def slots_per_unit(kind: Representative, r: int) -> int:
    """Number of stored vectors per unit."""
    return 2 * r if kind == "minmax" else r


def representatives(
    keys: torch.Tensor, mass: torch.Tensor, *, kind: Representative, r: int
) -> torch.Tensor:
    """Representatives of units.

    Args:
        keys: [B, H, N, U, D] pre-RoPE keys of N units of U tokens.
        mass: [B, H, N, U] attention each key received while in the local window.
    Returns:
        [B, H, N, R, D] with R = `slots_per_unit(kind, r)`, in the keys' dtype.
    """
    if kind == "attention":
        top = torch.topk(mass, r, dim=-1).indices  # [B, H, N, r]
        top = torch.sort(top, dim=-1).values
        return torch.gather(keys, 3, top.unsqueeze(-1).expand(*top.shape, keys.shape[-1]))
    slices = keys.unflatten(3, (r, keys.shape[3] // r))  # [B, H, N, r, U/r, D]
    if kind == "mean":
        return slices.float().mean(dim=4).to(keys.dtype)
    if kind == "minmax":
        return torch.cat((slices.amin(dim=4), slices.amax(dim=4)), dim=3)
    raise ValueError(f"unknown representative kind '{kind}'; expected attention, mean or minmax")
