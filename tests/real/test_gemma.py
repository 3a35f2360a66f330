"""The real Gemma-3-270M (built from the PyPI GGUF package), on the CPU: a ~4K-token passkey
prompt with a window of about 1K keys finds the key at three depths."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import agentmem
from agentmem import models
from agentmem.passkey import build_prompt, parse_answer

pytestmark = pytest.mark.slow

# 32 sinks + 4 units of 128 + 480 local: 1024 keys per query, a quarter of the prompt.
WINDOW_1K = agentmem.MemoryConfig(n_init=32, topk=4, unit_size=128, n_local=480, exec_chunk=256)


@pytest.fixture(scope="module")
def lm():
    return models.load("gemma-3-270m", WINDOW_1K, device="cpu")


def test_second_load_reads_the_converted_copy(lm, monkeypatch):
    copy = models.model_dir("gemma-3-270m") / "model.safetensors"
    with safe_open(str(copy), framework="pt") as weights:  # float16 on disk: half the size
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F16"}
    assert next(lm.model.parameters()).dtype == torch.float32  # computed in float32 on a CPU

    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", fail)
    again = models.load("gemma-3-270m", WINDOW_1K, device="cpu")
    assert again.model.config.model_type == "gemma3_text"
    assert agentmem.is_wrapped(again.model)


@pytest.mark.parametrize(("depth", "key"), [(0.1, "40715"), (0.3, "82936"), (0.7, "19385")])
def test_passkey_at_4k_with_a_1k_window(lm, depth, key):
    prompt = build_prompt(lm.tokenizer, 4096, depth, key)
    session = lm.session(progress=False)
    session.append_tokens(prompt.ids)
    layers = session.cache.memory_layers
    attended = max(
        layer.n_sinks + layer.last_ids.shape[-1] * layer.units.unit_size + layer.n_local
        for layer in layers
    )
    assert attended <= WINDOW_1K.window == 1024 < len(prompt.ids) // 3
    needle = set(range(*prompt.needle))
    recalled = [
        needle <= {i for start, end in layer.attended_spans() for i in range(start, end)}
        for layer in layers
    ]
    assert any(recalled)
    assert parse_answer(session.generate(max_new_tokens=8)) == key


def test_passkey_at_8k_through_the_faiss_index(lm):
    # The default layout (2K keys per query) finding its units through the HNSW index once a layer
    # holds 32 units (an 8K prompt packs about 120).
    memory = agentmem.MemoryConfig(index="faiss", index_min_units=32)
    prompt = build_prompt(lm.tokenizer, 8192, 0.4, "57310")
    session = lm.session(memory=memory, progress=False)
    session.append_tokens(prompt.ids)
    layers = session.cache.memory_layers
    assert all(layer.index.n_units == layer.units.n_units > 100 for layer in layers)
    assert parse_answer(session.generate(max_new_tokens=8)) == "57310"
