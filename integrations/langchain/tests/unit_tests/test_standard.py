"""LangChain's standard unit suite (`langchain-tests`) on ChatAgentMem with the tiny model."""

from __future__ import annotations

from langchain_agentmem import ChatAgentMem
from langchain_tests.unit_tests import ChatModelUnitTests

from agentmem import testing as tiny_models


class TestChatAgentMemUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatAgentMem]:
        return ChatAgentMem

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_models.model_dir(), "temperature": 0}

    @property
    def supports_json_mode(self) -> bool:
        return True
