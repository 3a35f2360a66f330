"""LangChain's standard integration suite (`langchain-tests`) on the real
qwen2.5-coder-0.5b-instruct, on the CPU (slow)."""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_agentmem import ChatAgentMem
from langchain_core.messages import AIMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow


class TestChatAgentMemIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatAgentMem]:
        return ChatAgentMem

    @property
    def chat_model_params(self) -> dict:
        return {"model": "qwen2.5-coder-0.5b-instruct"}

    @property
    def structured_output_kwargs(self) -> dict:
        """The suite's structured output as a JSON object decoded with the schema's keys; the
        default method (a forced tool call) is run below."""
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    @pytest.mark.xfail(
        reason="model skill: for the Japanese name the 0.5B model writes an unescaped quote "
        "inside a JSON string (measured: the call lands in invalid_tool_calls, 'Expecting "
        "delimiter'); the Chinese one passes"
    )
    def test_unicode_tool_call_integration(
        self, model, *, tool_choice=None, force_tool_call: bool = True
    ) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A second turn of a conversation: its history is read from memory."""
        llm = ChatAgentMem(**{**self.standard_chat_model_params, **self.chat_model_params},
                           session_id=f"cache-read-{stream}")  # fmt: skip
        asked = [HumanMessage("Name a colour.")]
        first = llm.invoke(asked)
        again = [*asked, first, HumanMessage("Another one?")]
        if not stream:
            return llm.invoke(again)
        chunks = list(llm.stream(again))
        whole = chunks[0]
        for chunk in chunks[1:]:
            whole += chunk
        return whole


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


def test_structured_output_by_function_calling():
    """The default method (the schema as a forced tool call), which the suite runs no more."""
    llm = ChatAgentMem(model="qwen2.5-coder-0.5b-instruct")
    joke = llm.with_structured_output(Joke).invoke("Tell me a joke about cats.")
    assert isinstance(joke, Joke) and joke.setup and joke.punchline
    as_dict = llm.with_structured_output(Joke.model_json_schema()).invoke("A joke about dogs?")
    assert set(as_dict) == {"setup", "punchline"}


def test_structured_output_with_listed_values():
    """An enum property is decoded from its values: the model picks one, it cannot misspell."""

    class Review(BaseModel):
        sentiment: Literal["positive", "negative"]
        stars: int = Field(description="1 to 5")

    llm = ChatAgentMem(model="qwen2.5-coder-0.5b-instruct")
    for method in ("json_schema", "function_calling"):
        review = llm.with_structured_output(Review, method=method).invoke(
            "The film was wonderful, I loved every minute of it."
        )
        assert review.sentiment == "positive", (method, review)
