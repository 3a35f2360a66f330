"""The live server answers an OpenAI client (a smoke test; the full suites are beside it)."""

from __future__ import annotations

import openai


def test_a_chat_completion_through_the_openai_client(live_server):
    client = openai.OpenAI(base_url=live_server.v1, api_key="key-alice")
    reply = client.chat.completions.create(
        model=live_server.model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
