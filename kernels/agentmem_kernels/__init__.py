"""agentmem's attention and retrieval kernels.

`reference` holds the exact pure-torch implementation of every entry point; it runs on any device
and is what the Triton kernels are tested against. `placed_attention` is the one entry point with
a Triton kernel so far: the backend is chosen once per device type (Triton on CUDA, the reference
elsewhere), logged, and can be forced with `AGENTMEM_KERNELS=reference|triton` or `use_backend`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from agentmem_kernels import reference
from agentmem_kernels.reference import (
    KeySegment,
    attention,
    gather_units,
    merge,
    rope,
    score_units,
    segment_attention,
    unit_logits,
)

__all__ = [
    "KeySegment",
    "attention",
    "backend",
    "gather_units",
    "merge",
    "placed_attention",
    "reference",
    "rope",
    "score_units",
    "segment_attention",
    "unit_logits",
    "use_backend",
]

BACKENDS = ("reference", "triton")
logger = logging.getLogger(__name__)
_chosen: dict[str, str] = {}  # device type -> backend


def backend(device: torch.device) -> str:
    """The backend of `placed_attention` on this kind of device, chosen on first use."""
    kind = torch.device(device).type
    if kind not in _chosen:
        forced = os.environ.get("AGENTMEM_KERNELS")
        if forced is not None and forced not in BACKENDS:
            raise ValueError(f"AGENTMEM_KERNELS={forced!r}; expected one of {BACKENDS}")
        _chosen[kind] = forced or ("triton" if kind == "cuda" and _has_triton() else "reference")
        logger.info("agentmem_kernels: %s kernels on %s", _chosen[kind], kind)
    return _chosen[kind]


def use_backend(name: str | None, device_type: str = "cuda") -> None:
    """Force a backend for a device type (None: choose again on next use); for tests."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name is None:
        _chosen.pop(device_type, None)
    else:
        _chosen[device_type] = name


def placed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs):
    """See `reference.placed_attention`; runs on the backend chosen for q's device."""
    return _implementation(backend(q.device), q)(q, k, v, **kwargs)


_unsupported_logged: set[str] = set()


def _implementation(name: str, q: torch.Tensor) -> Callable:
    if name == "reference":
        return reference.placed_attention
    from agentmem_kernels import triton_attention

    reason = triton_attention.supports(q)
    if reason is None:
        return triton_attention.placed_attention
    if reason not in _unsupported_logged:  # a shape the kernel does not cover: said once
        _unsupported_logged.add(reason)
        logger.warning("agentmem_kernels: reference attention because %s", reason)
    return reference.placed_attention


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
