"""LangChain messages as the chat template's message dicts (OpenAI's shape), which
`agentmem.chat.render` renders and cuts into pieces."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

# Content blocks that are not text to render: calls (LangChain's, Anthropic's and OpenAI's
# shapes, also in `message.tool_calls`) and reasoning.
TOOL_BLOCKS = ("tool_call", "tool_use", "function_call", "reasoning", "thinking")


def text_of(content: str | list, where: str) -> str:
    """A message's content as plain text: a string, or text blocks joined (no images, audio...)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in TOOL_BLOCKS:
            continue  # calls render from message.tool_calls; reasoning is not replayed
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"{where} holds a content block of type {kind!r}: ChatAgentMem reads text only"
            )
    return "".join(parts)


def template_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The chat template's message dicts for LangChain `messages` (OpenAI's shape: roles system,
    user, assistant with `tool_calls`, tool with `tool_call_id` and `name`)."""
    if not messages:
        raise ValueError("ChatAgentMem needs at least one message")
    names: dict[str, str] = {}  # tool call id -> tool name, for ToolMessages that lack a name
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"message {i} ({type(message).__name__})"
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": text_of(message.content, where)})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": text_of(message.content, where)})
        elif isinstance(message, AIMessage):
            content = text_of(message.content, where)
            entry: dict[str, Any] = {"role": "assistant", "content": content}
            calls = [*message.tool_calls, *_invalid_as_calls(message)]
            written = _as_written(message)
            if written is not None:  # the reply as the model wrote it: as its memory holds it
                entry["content"] = written
                calls = []
                for call in [*message.tool_calls, *message.invalid_tool_calls]:
                    names[call.get("id") or ""] = call.get("name") or ""
            if calls:
                entry["tool_calls"] = []
                for call in calls:
                    names[call.get("id") or ""] = call["name"]
                    entry["tool_calls"].append(
                        {
                            "id": call.get("id"),
                            "type": "function",
                            "function": {"name": call["name"], "arguments": call["args"]},
                        }
                    )
            out.append(entry)
        elif isinstance(message, ToolMessage):
            content = message.content
            text = content if isinstance(content, str) else _tool_content(content, where)
            out.append(
                {
                    "role": "tool",
                    "content": text,
                    "tool_call_id": message.tool_call_id,
                    "name": message.name or names.get(message.tool_call_id, ""),
                }
            )
        elif isinstance(message, ChatMessage):
            out.append({"role": message.role, "content": text_of(message.content, where)})
        else:
            raise ValueError(f"{where}: ChatAgentMem does not render {type(message).__name__}")
    return out


def _as_written(message: AIMessage) -> str | None:
    """The text ChatAgentMem's reply with tool calls was parsed from (kept in
    `additional_kwargs["agentmem"]`), while its calls are still the ones parsed from it: the
    template would render them in its own words, which the model may not have used."""
    kept = message.additional_kwargs.get("agentmem")
    if not isinstance(kept, dict) or not isinstance(kept.get("text"), str):
        return None
    ids = [call.get("id") for call in [*message.tool_calls, *message.invalid_tool_calls]]
    return kept["text"] if ids and ids == kept.get("tool_call_ids") else None


def _invalid_as_calls(message: AIMessage) -> list[dict]:
    """Invalid tool calls the model made stay in its history as it wrote them (as best the
    template allows: arguments that are not JSON become a string)."""
    calls = []
    for bad in message.invalid_tool_calls:
        if not bad.get("name"):
            continue
        try:
            args = json.loads(bad.get("args") or "{}")
        except json.JSONDecodeError:
            args = bad.get("args") or ""
        calls.append({"name": bad["name"], "args": args, "id": bad.get("id")})
    return calls


def _tool_content(content: list, where: str) -> str:
    """A ToolMessage's list content: text blocks as text, anything else as JSON."""
    try:
        return text_of(content, where)
    except ValueError:
        return json.dumps(content, ensure_ascii=False, default=str)
