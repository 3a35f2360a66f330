"""`agentmem serve` with the real qwen2.5-coder-0.5b-instruct (the `qwen-0.5b` extra) on the CPU,
reached over loopback by the official openai client: a tool call and its result answered in
the next turn with only the new tokens prefilled, a streamed reply equal to the unstreamed one,
a session resumed by a restarted server."""

from __future__ import annotations

import json

import openai
import pytest

from agentmem.chat import engine
from agentmem.persistence import Store
from agentmem.server.app import create_app
from agentmem.testing import free_port, run_server
from tests.real.test_qwen import WEATHER

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b-instruct"


def serving(root):
    """A server on `root`'s store; returns (client, stop)."""
    engine._threads.clear()  # as a new process: nothing held in memory but the store
    store = Store(root=root)
    port = free_port()
    server, thread = run_server(create_app(MODEL, store), port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=60)
        store.close()

    return client, stop


def test_a_tool_call_round_trip_is_prefilled_once_and_resumes_on_a_new_server(tmp_path):
    client, stop = serving(tmp_path)
    try:
        asked = [{"role": "user", "content": "What's the weather in Paris?"}]
        first = client.chat.completions.create(
            model=MODEL, messages=asked, tools=[WEATHER], tool_choice="required", max_tokens=48,
            extra_body={"session_id": "trip"},
        )  # fmt: skip
        (call,) = first.choices[0].message.tool_calls
        assert (
            call.function.name == "get_weather" and first.choices[0].finish_reason == "tool_calls"
        )
        assert "paris" in json.loads(call.function.arguments)["city"].lower()
        history = [
            *asked,
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius."},
        ]
        second = client.chat.completions.create(
            model=MODEL, messages=history, tools=[WEATHER], max_tokens=24,
            extra_body={"session_id": "trip"},
        )  # fmt: skip
        held = first.usage.prompt_tokens + first.usage.completion_tokens
        assert second.usage.prompt_tokens_details.cached_tokens == held  # not read again
        assert second.model_extra["agentmem"]["prefilled_tokens"] < 40
        done = second.usage.prompt_tokens + second.usage.completion_tokens
    finally:
        stop()
    client, stop = serving(tmp_path)  # another server on the same store
    try:
        third = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Thanks!"}], max_tokens=8,
            extra_body={"session_id": "trip"},
        )  # fmt: skip
        assert third.model_extra["agentmem"]["appended"] is True  # only the new message sent
        assert third.usage.prompt_tokens_details.cached_tokens == done
    finally:
        stop()


def test_a_streamed_reply_is_the_unstreamed_one(tmp_path):
    client, stop = serving(tmp_path)
    try:
        asked = [{"role": "user", "content": "Write a haiku about memory."}]
        whole = client.chat.completions.create(model=MODEL, messages=asked, max_tokens=24)
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=asked,
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content and text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finally:
        stop()
