"""Fixtures shared by every test; the factories live in tests/helpers.py."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from tests.helpers import FAMILIES, char_tokenizer


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()
