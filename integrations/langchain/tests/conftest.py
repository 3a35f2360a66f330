"""Fixtures of the langchain-agentmem tests: the tiny model's directory (`agentmem.testing`), and a
clean slate of conversations for every test."""

from __future__ import annotations

import os

import torch

# Triton reads this when a kernel is defined: without a GPU, kernels run in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentmem import testing as tiny_models  # noqa: E402
from agentmem.chat import engine as _engine  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A saved tiny model directory (`ChatAgentMem(model=...)` takes its path)."""
    return tiny_models.model_dir()


@pytest.fixture(autouse=True)
def _fresh_threads():
    """Every test starts with no conversation in memory (models stay loaded)."""
    _engine._threads.clear()
    yield
    _engine._threads.clear()
