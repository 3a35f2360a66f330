"""agentmem's attention and retrieval kernels.

`reference` holds the exact pure-torch implementation of every entry point; it runs on any device
and is what the Triton kernels are tested against. `placed_attention`, `memory_attention`,
`local_key_mass`, `unit_mass` and `top_units` (hence `score_units`), `append_token` (a captured
decoding step's bookkeeping), `fetch_units` and `copy_units` (a tiered memory's device cache) have
Triton kernels: the backend is chosen once per device type (Triton on CUDA, the reference
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
    segment_attention,
    unit_logits,
)

__all__ = [
    "KeySegment",
    "append_token",
    "attention",
    "backend",
    "capturable",
    "copy_units",
    "fetch_units",
    "gather_units",
    "local_key_mass",
    "memory_attention",
    "merge",
    "placed_attention",
    "reference",
    "rope",
    "score_units",
    "segment_attention",
    "top_units",
    "unit_logits",
    "unit_mass",
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
    return _implementation("placed_attention", q)(q, k, v, **kwargs)


def memory_attention(q: torch.Tensor, **kwargs):
    """See `reference.memory_attention`; runs on the backend chosen for q's device."""
    return _implementation("memory_attention", q)(q, **kwargs)


def local_key_mass(q: torch.Tensor, local_k: torch.Tensor, **kwargs) -> torch.Tensor:
    """See `reference.local_key_mass`; runs on the backend chosen for q's device."""
    return _implementation("local_key_mass", q)(q, local_k, **kwargs)


def unit_mass(q: torch.Tensor, reps: torch.Tensor, **kwargs) -> torch.Tensor:
    """See `reference.unit_mass`; runs on the backend chosen for q's device."""
    return _implementation("unit_mass", q)(q, reps, **kwargs)


def top_units(mass: torch.Tensor, k: int, *, ascending: bool = True) -> torch.Tensor:
    """See `reference.top_units`; runs on the backend chosen for mass's device."""
    return _implementation("top_units", mass)(mass, k, ascending=ascending)


def score_units(
    q: torch.Tensor, reps: torch.Tensor, *, k: int, ascending: bool = True, **kwargs
) -> torch.Tensor:
    """See `reference.score_units`: `unit_mass` on the chosen backend, then the exact top-k."""
    return top_units(unit_mass(q, reps, **kwargs), k, ascending=ascending)


def copy_units(
    src_k: torch.Tensor, src_v: torch.Tensor, ids: torch.Tensor,
    dst_k: torch.Tensor, dst_v: torch.Tensor, slots: torch.Tensor, unit_size: int,
) -> None:  # fmt: skip
    """See `reference.copy_units`; runs on the backend chosen for the device of the side not in
    host memory."""
    run = _implementation("copy_units", dst_k if dst_k.device.type != "cpu" else src_k)
    run(src_k, src_v, ids, dst_k, dst_v, slots, unit_size)


def fetch_units(
    ids: torch.Tensor, slot_of: torch.Tensor, unit_of: torch.Tensor, last_used: torch.Tensor,
    counters: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """See `reference.fetch_units`; runs on the backend chosen for the tables' device."""
    return _implementation("fetch_units", slot_of)(ids, slot_of, unit_of, last_used, counters)


def append_token(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, **kwargs) -> None:
    """See `reference.append_token`; runs on the backend chosen for k's device."""
    _implementation("append_token", k)(k, v, q, **kwargs)


def capturable(device: torch.device, head_dim: int) -> bool:
    """Whether a memory step on this device reads nothing back to the host, so that a CUDA graph
    can capture it: the Triton backend with a head size its kernels cover."""
    if torch.device(device).type != "cuda" or backend(device) != "triton":
        return False
    from agentmem_kernels import triton_attention

    return triton_attention.supports(torch.empty(0, head_dim)) is None


_unsupported_logged: set[str] = set()
_TRITON_MODULES = {
    "placed_attention": "triton_attention",
    "memory_attention": "triton_memory",
    "unit_mass": "triton_memory",
    "local_key_mass": "triton_memory",
    "copy_units": "triton_memory",
    "fetch_units": "triton_memory",
    "append_token": "triton_memory",
    "top_units": "triton_memory",
}
# Entries whose kernels take any head size (they move whole rows, or only look up tables).
_ANY_HEAD_SIZE = ("copy_units", "fetch_units", "top_units")


# fp32 on a GPU: these two go to the reference (cuBLAS), which is as fast there. Measured on an
# H100 at Gemma-3's head size 256, 1024 queries: unit_mass 2.8 ms (Triton, one tf32 pass) against
# 3.1 ms, local_key_mass 0.72 against 0.74 ms; with the near-fp32 products (FP32_DOT) unit_mass's
# tiles exceed shared memory. Both read nothing back, so graphs capture either.
_REFERENCE_FOR_FP32_ON_GPU = ("unit_mass", "local_key_mass")


def _implementation(entry: str, q: torch.Tensor) -> Callable:
    fallback = getattr(reference, entry)
    if backend(q.device) == "reference":
        return fallback
    if entry in _REFERENCE_FOR_FP32_ON_GPU and q.is_cuda and q.dtype == torch.float32:
        return fallback
    import importlib

    from agentmem_kernels import triton_attention

    reason = None if entry in _ANY_HEAD_SIZE else triton_attention.supports(q)
    if reason is None:
        module = importlib.import_module(f"agentmem_kernels.{_TRITON_MODULES[entry]}")
        return getattr(module, entry)
    if reason not in _unsupported_logged:  # a shape the kernels do not cover: said once
        _unsupported_logged.add(reason)
        logger.warning("agentmem_kernels: reference kernels because %s", reason)
    return fallback


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
