"""ChatAgentMem on the real qwen2.5-coder-0.5b-instruct (the `qwen-0.5b` extra), on the CPU: a
tool call from a plain question, the tool's result answered in the next turn with only the new
tokens prefilled, tool calls streamed as chunks, a forced call, sampling."""

from __future__ import annotations

import pytest
from langchain_agentmem import ChatAgentMem
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

pytestmark = pytest.mark.slow


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"It is sunny and 24 degrees Celsius in {city}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


# Model skill, measured 2026-12-01: shown get_weather's result, the 0.5B model writes the same
# call again instead of answering, and so does plain transformers `generate` with full attention
# on the same prompt (and the 1.5B model: '{"name": "get_weather", "arguments": {"city":
# "Paris"}}'), so it is not agentmem's memory. Banned from opening with a bare call, it writes
# '({"name": "get_weather", ...'.
REPEATS = "the 0.5B model (like full attention) writes the tool call again instead of answering"


def _answer_or_xfail(reply) -> None:
    """The reply answers from the tool's result, unless it repeats the call (model skill)."""
    if reply.tool_calls or "get_weather" in reply.content:
        pytest.xfail(REPEATS)
    assert "24" in reply.content or "sunny" in reply.content.lower(), reply.content


@pytest.fixture(scope="module")
def llm() -> ChatAgentMem:
    return ChatAgentMem(max_tokens=64)  # the default model, built in


def test_a_question_that_needs_a_tool_gets_a_tool_call_then_the_answer(llm):
    bound = llm.bind_tools([get_weather, add])
    asked = [HumanMessage("What's the weather in Paris?")]
    first = bound.invoke(asked, session_id="weather")
    assert [c["name"] for c in first.tool_calls] == ["get_weather"], first
    assert "paris" in first.tool_calls[0]["args"]["city"].lower()
    assert first.response_metadata["finish_reason"] == "tool_calls"
    result = get_weather.invoke(first.tool_calls[0])  # a ToolMessage
    assert isinstance(result, ToolMessage)
    second = bound.invoke([*asked, first, result], session_id="weather")
    held = first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"]
    usage = second.usage_metadata
    if "agentmem" in first.additional_kwargs:  # the call was written in <tool_call> tags
        assert usage["input_token_details"]["cache_read"] == held  # the history not re-read
        assert second.response_metadata["prefilled_tokens"] < 60 < held
    else:  # a bare JSON call: the history renders it as the template's call, a new branch
        assert second.response_metadata["forked"] is True
    _answer_or_xfail(second)


def test_a_forced_call_and_its_result_are_not_prefilled_again(llm):
    bound = llm.bind_tools([get_weather, add])
    asked = [HumanMessage("What's the weather in Rome?")]
    first = bound.invoke(asked, session_id="forced", tool_choice="get_weather")
    assert [c["name"] for c in first.tool_calls] == ["get_weather"], first
    # The grammar closed the call and ended the reply there, as the template renders a call.
    assert first.additional_kwargs["agentmem"]["text"].endswith("}}\n</tool_call>")
    assert first.response_metadata["finish_reason"] == "tool_calls"
    result = get_weather.invoke(first.tool_calls[0])
    second = bound.invoke([*asked, first, result], session_id="forced")
    held = first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"]
    assert second.response_metadata["forked"] is False
    assert second.usage_metadata["input_token_details"]["cache_read"] == held
    new = second.response_metadata["prefilled_tokens"]
    assert 0 < new < 60 < held  # the tool result's turn only
    _answer_or_xfail(second)


def test_streaming_with_tools_yields_tool_call_chunks(llm):
    bound = llm.bind_tools([get_weather, add])
    chunks = list(bound.stream([HumanMessage("What is 17 plus 25? Use the tool.")]))
    assert any(c.tool_call_chunks for c in chunks)
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert [c["name"] for c in whole.tool_calls] == ["add"], whole
    assert whole.tool_calls[0]["args"] == {"a": 17, "b": 25}


def test_text_streams_token_by_token(llm):
    chunks = list(llm.stream([SystemMessage("Answer in one sentence."), HumanMessage("Hi!")]))
    assert len([c for c in chunks if c.content]) > 3
    assert chunks[-1].usage_metadata["output_tokens"] > 3


def test_a_named_tool_choice_forces_a_valid_call(llm):
    bound = llm.bind_tools([get_weather, add], tool_choice="get_weather")
    reply = bound.invoke([HumanMessage("I am flying to Tokyo tomorrow.")])
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"], reply
    assert "tokyo" in reply.tool_calls[0]["args"]["city"].lower()


def test_sampling_with_a_seed_repeats(llm):
    kwargs = {"temperature": 0.8, "top_p": 0.9, "seed": 123, "max_tokens": 16}
    question = [HumanMessage("Name a colour.")]
    assert llm.invoke(question, **kwargs).content == llm.invoke(question, **kwargs).content
