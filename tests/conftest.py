"""Fixtures shared by every test; the factories live in tests/helpers.py."""

from __future__ import annotations

import os

import torch

# Triton reads this when a kernel is defined: without a GPU, kernels run in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from tests.helpers import FAMILIES, char_tokenizer  # noqa: E402


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()
