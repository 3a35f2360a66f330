"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """Every Triton scratch buffer starts as NaN, so that an element a kernel forgot to write
    shows up in the result."""
    triton_attention = pytest.importorskip("agentmem_kernels.triton_attention")

    def alloc(shape, device, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_attention, "_alloc", alloc)
