"""`agentmem serve` through the official `openai` client: completions, streaming, sampling, stop
strings, tools, JSON mode, and the conversations agentmem's memory serves. The tiny model writes
random text: the tests check structure, usage and memory, never wording."""

from __future__ import annotations

import json

import openai
import pytest

# The tiny tokenizer knows only the characters of `agentmem.testing.TEXT`: the tests' texts
# stay within them.
USER = [{"role": "user", "content": "What is the weather in Paris?"}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "sunny", "warm"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "warm"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.v1, api_key="key-alice", max_retries=0)


def agentmem_of(obj) -> dict:
    """The `agentmem` object the server adds to a completion (or a final chunk)."""
    return obj.model_extra["agentmem"]


def create(client, live_server, **kwargs):
    kwargs.setdefault("messages", USER)
    return client.chat.completions.create(model=live_server.model, **kwargs)


def assert_usage_consistent(reply) -> None:
    u = reply.usage
    assert u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    cached = u.prompt_tokens_details.cached_tokens
    assert 0 <= cached <= u.prompt_tokens
    assert agentmem_of(reply)["prefilled_tokens"] == u.prompt_tokens - cached


# -- plain completions -------------------------------------------------------------------------


def test_non_streaming_reply_has_content_finish_reason_and_consistent_usage(client, live_server):
    """A reply cut by max_tokens: text, finish_reason "length", usage that adds up."""
    reply = create(client, live_server, max_tokens=7)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == live_server.model
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert_usage_consistent(reply)
    # No session: a conversation of its own, nothing cached.
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert agentmem_of(reply)["session_id"] is None


def test_max_tokens_bounds_the_completion(client, live_server):
    """max_tokens (and max_completion_tokens) set the number of tokens a cut reply has."""
    for n in (1, 3):
        reply = create(client, live_server, max_tokens=n)
        assert reply.usage.completion_tokens == n
        assert reply.choices[0].finish_reason == "length"
    reply = create(client, live_server, max_completion_tokens=5)
    assert reply.usage.completion_tokens == 5


def test_a_stop_string_from_a_greedy_reply_cuts_it_there(client, live_server):
    """A stop string taken from the middle of a greedy reply ends the same request there, with
    finish_reason "stop" and the stop string left out."""
    whole = create(client, live_server, max_tokens=16, temperature=0).choices[0].message.content
    stop = next(
        (whole[i : i + 3] for i in range(4, len(whole) - 3) if whole[i : i + 3].strip()), None
    )
    assert stop is not None, f"the greedy reply is too short to take a stop string: {whole!r}"
    cut = create(client, live_server, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == whole[: whole.find(stop)]
    assert cut.usage.completion_tokens < 16
    # A lone string works as a list of one.
    single = create(client, live_server, max_tokens=16, temperature=0, stop=stop)
    assert single.choices[0].message.content == cut.choices[0].message.content


def test_same_seed_gives_the_same_sampled_text(client, live_server):
    """Sampling at temperature 1 with a seed is reproducible; other seeds sample otherwise."""
    texts = {
        seed: [
            create(client, live_server, max_tokens=8, temperature=1.0, seed=seed)
            .choices[0]
            .message.content
            for _ in range(2)
        ]
        for seed in (1, 2, 3)
    }
    for seed, (a, b) in texts.items():
        assert a == b, f"seed {seed} gave two texts"
    assert len({a for a, _ in texts.values()}) > 1, "three seeds sampled the same text"


def test_greedy_is_deterministic(client, live_server):
    """temperature 0 (the default) gives one text for one request."""
    a = create(client, live_server, max_tokens=10).choices[0].message.content
    b = create(client, live_server, max_tokens=10, temperature=0).choices[0].message.content
    assert a == b


# -- streaming ---------------------------------------------------------------------------------


def test_stream_starts_with_the_role_and_ends_with_finish_reason(client, live_server):
    """Chunks: the assistant role first, content deltas, a last choice with finish_reason."""
    chunks = list(create(client, live_server, max_tokens=6, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None  # not asked for
    assert agentmem_of(chunks[-1])["session_id"] is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text


def test_stream_include_usage_gives_a_last_chunk_of_usage_and_no_choices(client, live_server):
    """stream_options include_usage: a final chunk with empty choices and the usage."""
    chunks = list(
        create(
            client, live_server, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_streamed_text_equals_the_same_greedy_reply_not_streamed(client, live_server):
    """The deltas concatenate into the text the same greedy request gets in one piece."""
    whole = create(client, live_server, max_tokens=20)
    chunks = list(create(client, live_server, max_tokens=20, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# -- tools and JSON ----------------------------------------------------------------------------


def _call(reply):
    calls = reply.choices[0].message.tool_calls
    assert calls, f"no tool call: {reply.choices[0].message!r}"
    assert len(calls) == 1
    return calls[0]


def test_tool_choice_required_makes_a_tool_call(client, live_server):
    """tool_choice "required": a call to an offered tool, valid JSON arguments,
    finish_reason "tool_calls"."""
    reply = create(
        client, live_server, max_tokens=40, tools=[WEATHER, TIME], tool_choice="required"
    )
    call = _call(reply)
    assert call.type == "function" and call.id
    assert call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "sunny", "warm")
    assert reply.choices[0].finish_reason == "tool_calls"


def test_tool_choice_naming_a_function_calls_that_function(client, live_server):
    """A named tool_choice forces that very function, even with another offered."""
    for name in ("get_weather", "get_time"):
        reply = create(
            client,
            live_server,
            max_tokens=40,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": name}},
        )
        call = _call(reply)
        assert call.function.name == name
        assert isinstance(json.loads(call.function.arguments), dict)
        assert reply.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_call_deltas_assemble_into_the_non_streamed_call(client, live_server):
    """The tool-call deltas of a stream (name, then pieces of arguments, by index) make the call
    the same greedy request gets in one piece."""
    kwargs = dict(
        max_tokens=40,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = _call(create(client, live_server, **kwargs))
    chunks = list(create(client, live_server, stream=True, **kwargs))
    assembled: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = assembled.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                entry["id"] = delta.id
            if delta.function and delta.function.name:
                entry["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                entry["arguments"] += delta.function.arguments
    assert list(assembled) == [0]
    streamed = assembled[0]
    assert streamed["id"]
    assert streamed["name"] == call.function.name == "get_weather"
    assert json.loads(streamed["arguments"]) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_object_response_format_gives_a_json_object(client, live_server):
    """response_format json_object: the grammar makes the reply a JSON object; one that ended
    ("stop") parses as an object, one cut by max_tokens is at least an object's start."""
    for max_tokens in (4, 30):
        reply = create(
            client,
            live_server,
            max_tokens=max_tokens,
            response_format={"type": "json_object"},
        )
        content = reply.choices[0].message.content
        assert content.lstrip().startswith("{"), content
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
        else:
            assert reply.choices[0].finish_reason == "length"
            assert reply.usage.completion_tokens == max_tokens


# -- conversations in memory -------------------------------------------------------------------


def test_resending_the_whole_conversation_is_served_from_memory(client, live_server):
    """Turn two re-sends turn one and its reply: all of it comes from memory (cached tokens =
    turn one's prompt + completion), only the new message is prefilled."""
    first = create(client, live_server, max_tokens=8, extra_body={"session_id": "conv-a"})
    assert agentmem_of(first)["session_id"] == "conv-a"
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = [
        *USER,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And is it warm?"},
    ]
    second = create(
        client, live_server, messages=history, max_tokens=8, extra_body={"session_id": "conv-a"}
    )
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == held
    meta = agentmem_of(second)
    assert meta["session_id"] == "conv-a"
    assert meta["forked"] is False and meta["appended"] is False
    assert 0 < meta["prefilled_tokens"] < 40  # the new user message and the prompt, no more
    assert meta["prefilled_tokens"] < first.usage.prompt_tokens
    assert_usage_consistent(second)


def test_only_new_messages_continue_the_session(client, live_server):
    """A turn that sends only its new message follows what the session holds (appended)."""
    first = create(client, live_server, max_tokens=8, extra_body={"session_id": "conv-b"})
    second = create(
        client,
        live_server,
        messages=[{"role": "user", "content": "And is it warm?"}],
        max_tokens=8,
        extra_body={"session_id": "conv-b"},
    )
    meta = agentmem_of(second)
    assert meta["appended"] is True and meta["forked"] is False
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens > cached
    assert_usage_consistent(second)


def test_an_edited_past_forks_the_session(client, live_server):
    """A history whose past reply was edited diverges from memory: a fork, marked so, which
    keeps only the shared prefix in cache."""
    first = create(client, live_server, max_tokens=8, extra_body={"session_id": "conv-c"})
    edited = [
        *USER,
        {"role": "assistant", "content": "An edited answer, not the one given."},
        {"role": "user", "content": "And is it warm?"},
    ]
    second = create(
        client, live_server, messages=edited, max_tokens=8, extra_body={"session_id": "conv-c"}
    )
    meta = agentmem_of(second)
    assert meta["forked"] is True and meta["appended"] is False
    assert meta["session_id"] != "conv-c" and meta["session_id"].startswith("conv-c")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < first.usage.prompt_tokens + first.usage.completion_tokens


def test_x_session_id_header_works_like_session_id(client, live_server):
    """The X-Session-ID header names the session as the body's session_id does."""
    headers = {"X-Session-ID": "conv-h"}
    first = create(client, live_server, max_tokens=8, extra_headers=headers)
    assert agentmem_of(first)["session_id"] == "conv-h"
    history = [
        *USER,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And is it warm?"},
    ]
    second = create(client, live_server, messages=history, max_tokens=8, extra_headers=headers)
    assert second.usage.prompt_tokens_details.cached_tokens == (
        first.usage.prompt_tokens + first.usage.completion_tokens
    )
    # The body's session_id names the same conversation.
    third = create(
        client,
        live_server,
        messages=[{"role": "user", "content": "And the dog?"}],
        max_tokens=4,
        extra_body={"session_id": "conv-h"},
    )
    assert agentmem_of(third)["appended"] is True
    assert third.usage.prompt_tokens_details.cached_tokens == (
        second.usage.prompt_tokens + second.usage.completion_tokens
    )


# -- models ------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client, live_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [live_server.model]
    assert models.data[0].object == "model"


def test_an_unknown_model_is_not_found(client, live_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=2)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    assert "no-such-model" in e.value.message
