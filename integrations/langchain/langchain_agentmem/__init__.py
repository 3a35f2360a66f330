"""langchain-agentmem: LangChain's chat model on agentmem (local LLMs with an unbounded,
persistent KV memory)."""

from importlib import metadata

from langchain_agentmem.chat_models import ChatAgentMem

try:
    __version__ = metadata.version("langchain-agentmem")
except metadata.PackageNotFoundError:  # run from a source tree
    __version__ = ""

__all__ = ["ChatAgentMem", "__version__"]
