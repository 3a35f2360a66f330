"""LangChain's standard integration suite (`langchain-tests`) on the real
qwen2.5-coder-0.5b-instruct, on the CPU (slow)."""

from __future__ import annotations

import pytest
from langchain_agentmem import ChatAgentMem
from langchain_core.messages import AIMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

pytestmark = pytest.mark.slow


class TestChatAgentMemIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatAgentMem]:
        return ChatAgentMem

    @property
    def chat_model_params(self) -> dict:
        return {"model": "qwen2.5-coder-0.5b-instruct"}

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
