"""A LangGraph agent (`langchain.agents.create_agent`, the successor of LangGraph's prebuilt
`create_react_agent`) on the real qwen2.5-coder-0.5b-instruct: it calls its tool, answers from
the result, and its `thread_id` selects the stored agentmem session, which the next turn
continues without prefilling the history again."""

from __future__ import annotations

import pytest
from langchain.agents import create_agent
from langchain_agentmem import ChatAgentMem
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

import agentmem

pytestmark = pytest.mark.slow


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"It is sunny and 24 degrees Celsius in {city}."


def test_a_react_agent_calls_its_tool_and_its_thread_is_the_stored_session(tmp_path):
    store = agentmem.Store(root=tmp_path)
    agent = create_agent(
        ChatAgentMem(store=store, max_tokens=64), [get_weather], checkpointer=InMemorySaver(),
        system_prompt="You are a helpful assistant. Call a tool when you need facts; once you "
        "have a tool's result, answer the user in one sentence.",
    )  # fmt: skip
    config = {"configurable": {"thread_id": "trip-1"}}
    out = agent.invoke({"messages": [("user", "What's the weather in Paris?")]}, config)
    kinds = [m.type for m in out["messages"]]
    assert kinds[:3] == ["human", "ai", "tool"], kinds
    assert out["messages"][1].tool_calls[0]["name"] == "get_weather"
    assert "Paris" in out["messages"][2].content
    answer = out["messages"][-1]
    assert answer.type == "ai" and not answer.tool_calls
    assert "24" in answer.content or "sunny" in answer.content.lower(), answer.content
    # The thread is the stored session (a branch of it only if the history had diverged).
    assert answer.response_metadata["session_id"].split(":")[0] == "trip-1"
    stored = [m.text for m in store.messages(answer.response_metadata["session_id"])]
    assert any("sunny and 24 degrees" in text for text in stored)

    again = agent.invoke({"messages": [("user", "And should I take an umbrella?")]}, config)
    reply = again["messages"][-1]
    usage = reply.usage_metadata
    assert usage["input_token_details"]["cache_read"] > 0.9 * usage["input_tokens"]
    assert reply.response_metadata["prefilled_tokens"] < 40
