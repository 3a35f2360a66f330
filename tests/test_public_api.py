"""The public API is what `__all__` says, and every name in it resolves."""

from __future__ import annotations

import subprocess
import sys

import agentmem

PUBLIC = [
    "AgentMemCache",
    "BUILTIN_MODELS",
    "LanguageModel",
    "MemoryConfig",
    "POSITIONS",
    "PersistentSession",
    "PRESETS",
    "Recall",
    "SUPPORTED_MODEL_TYPES",
    "Sampling",
    "Session",
    "Store",
    "decode_one_token",
    "greedy",
    "is_wrapped",
    "load",
    "models",
    "new_cache",
    "prefill",
    "sampling",
    "unwrap",
    "unwrapped",
    "wrap",
]


def test_all_is_pinned():
    assert sorted(agentmem.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(agentmem, name) is not None


def test_the_api_the_issues_promised_is_importable_from_the_top():
    from agentmem.generate import decode_one_token, greedy, prefill
    from agentmem.models import load
    from agentmem.session import LanguageModel, Recall, Session

    assert agentmem.load is load and agentmem.LanguageModel is LanguageModel
    assert agentmem.Session is Session and agentmem.Recall is Recall
    assert (agentmem.prefill, agentmem.decode_one_token, agentmem.greedy) == (
        prefill, decode_one_token, greedy,
    )  # fmt: skip
    assert set(agentmem.BUILTIN_MODELS) == {
        "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
    }  # fmt: skip


def test_a_fresh_interpreter_imports_it():
    done = subprocess.run(
        [sys.executable, "-c", "import agentmem; agentmem.load; print(agentmem.__all__[0])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == agentmem.__all__[0]
