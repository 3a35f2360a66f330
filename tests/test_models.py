"""Model loading: clear errors for names that are neither built in nor on disk; a local directory
loads and is wrapped."""

from __future__ import annotations

import pytest

import agentmem
from agentmem import models
from tests.helpers import build


def test_unknown_model_says_nothing_is_downloaded():
    with pytest.raises(ValueError, match="never downloads"):
        models.load("meta-llama/Llama-3.1-8B")


def test_a_local_directory_loads_wrapped(tmp_path, tokenizer):
    build("qwen2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = models.load(tmp_path, agentmem.MemoryConfig(topk=2), device="cpu")
    assert agentmem.is_wrapped(lm.model)
    assert lm.memory.topk == 2
    session = lm.session()
    assert session.append("hello") == 6
    assert isinstance(session.generate(max_new_tokens=3), str)


def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTMEM_HOME", str(tmp_path))
    assert models.home() == tmp_path
