"""`agentmem serve` behind LangChain's `ChatOpenAI`: invoke, stream (with usage), bound tools.
The tiny model writes random text: the tests check structure and usage, never wording."""

from __future__ import annotations

import langchain_openai
from langchain_core.messages import AIMessage, AIMessageChunk

from tests.server.test_openai_client import WEATHER  # an enum: short arguments

QUESTION = "What is the weather in Paris?"


def chat_model(live_server, **kwargs) -> langchain_openai.ChatOpenAI:
    kwargs.setdefault("max_tokens", 6)
    return langchain_openai.ChatOpenAI(
        base_url=live_server.v1,
        api_key="key-alice",
        model=live_server.model,
        max_retries=0,
        **kwargs,
    )


def test_invoke_returns_an_ai_message_with_usage(live_server):
    """invoke: an AIMessage with text, the finish reason and usage metadata."""
    reply = chat_model(live_server).invoke(QUESTION)
    assert isinstance(reply, AIMessage)
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] == "length"
    usage = reply.usage_metadata
    assert usage["output_tokens"] == 6
    assert usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + 6


def test_stream_yields_chunks_that_add_up_to_the_invoked_reply(live_server):
    """stream: AIMessageChunks whose sum is the reply invoke gets (greedy, no session)."""
    model = chat_model(live_server)
    whole = model.invoke(QUESTION)
    chunks = list(model.stream(QUESTION))
    assert len(chunks) > 1
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.content == whole.content
    assert total.response_metadata.get("finish_reason") == "length"


def test_stream_usage_puts_usage_metadata_on_the_streamed_sum(live_server):
    """stream_usage=True: the summed chunks carry the reply's token counts."""
    chunks = list(chat_model(live_server, stream_usage=True).stream(QUESTION))
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    usage = total.usage_metadata
    assert usage is not None
    assert usage["output_tokens"] == 6
    assert usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_bind_tools_with_a_forced_choice_gives_a_tool_call(live_server):
    """bind_tools with tool_choice naming the tool: a parsed tool call of that tool."""
    model = chat_model(live_server, max_tokens=40).bind_tools([WEATHER], tool_choice="get_weather")
    reply = model.invoke(QUESTION)
    assert reply.tool_calls, reply
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather"
    assert call["args"]["city"] in WEATHER["function"]["parameters"]["properties"]["city"]["enum"]
    assert call["id"]
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    assert not reply.invalid_tool_calls
