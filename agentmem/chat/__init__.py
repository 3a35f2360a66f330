"""Chat on an agentmem session, shared by the LangChain integration and `agentmem serve`: a
conversation of OpenAI-shaped message dicts rendered through the model's own chat template,
matched against what the session's memory holds (only what is new is prefilled), decoded under
the constraints `tool_choice` or `response_format` ask for, and split into text and tool calls
as it streams."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import agentmem
from agentmem.chat import decoding, engine, render
from agentmem.chat import tools as tool_calls
from agentmem.chat.engine import Outcome, language_model
from agentmem.chat.formats import JsonFormat, instruction, json_format
from agentmem.chat.tools import Event, chosen_tool


@dataclass
class Reply:
    """What one reply is asked for: the conversation (the chat template's message dicts), the
    tools it may call (OpenAI's format) and `tool_choice`, or a `json` format; how long it may be
    and how it is sampled (`sampling`: temperature, top_p, top_k, seed, None their defaults);
    the session it continues (None: a conversation of its own)."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    tools: list[dict] = field(default_factory=list)
    tool_choice: Any = None
    json: JsonFormat | None = None
    stop: tuple[str, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    tenant: str = "default"
    memory: agentmem.MemoryConfig | None = None
    # The messages may be only the session's new ones (`agentmem serve`'s rule): they are, when
    # they do not begin with the message the session begins with; then they follow it.
    may_be_new: bool = False


def events(reply: Reply, *, store: Any = None, cancel: threading.Event | None = None,
           pauses: bool = False) -> Iterator[Event | Outcome | None]:  # fmt: skip
    """The reply as `tools.Event`s (text, a call begun, pieces of its arguments, the call) while
    it decodes, then its `Outcome` (usage, finish reason, the session, what was recalled). With
    `pauses`, also None after each chunk of the history's prefill: a scheduler that advances
    several replies item by item decodes the others there."""
    lm = language_model(reply.model)
    tok = lm.tokenizer
    names = [t["function"]["name"] for t in reply.tools]
    messages = list(reply.messages)
    if reply.json is not None:  # right before the reply, after the history it continues
        messages.append({"role": "system", "content": instruction(reply.json)})
    pieces = render.pieces(tok, messages, reply.tools)
    continuation = None
    if reply.may_be_new and reply.session_id is not None:
        continuation = render.continuation(tok, messages, reply.tools)
    choice = chosen_tool(reply.tool_choice, names) if reply.tools else "auto"
    answering = bool(messages) and messages[-1]["role"] == "tool"  # a tool's result is last
    forced, constraints = decoding.constraints(
        lm, reply.tools, reply.tool_choice, choice, reply.json, model=reply.model,
        answering=answering,
    )  # fmt: skip
    request = engine.Request(
        pieces=pieces, forced=forced, max_new_tokens=reply.max_tokens,
        sampling=decoding.sampling(reply.sampling, constraints), stop=reply.stop,
        memory=reply.memory, continuation=continuation,
    )  # fmt: skip
    th = engine.thread(reply.model, reply.session_id, store, reply.tenant)
    run = engine.Run(lm, th, request, store=store, tenant=reply.tenant, cancel=cancel)
    splitter = tool_calls.ToolSplitter(names, parse=bool(reply.tools) and choice != "none")
    yield from splitter.feed(forced)
    for delta in run:
        if not delta:  # a pause in the prefill
            if pauses:
                yield None
            continue
        yield from splitter.feed(delta)
    yield from splitter.finish()
    yield run.outcome


@dataclass
class Completion:
    """A whole reply: its text, the tool calls parsed from it (valid and invalid ones, as dicts:
    name, args, id, type "tool_call" or "invalid_tool_call"), and its `Outcome`."""

    text: str
    tool_calls: list[dict]
    outcome: Outcome


def complete(reply: Reply, *, store: Any = None,
             cancel: threading.Event | None = None) -> Completion:  # fmt: skip
    """The reply decoded to its end (`events`, collected)."""
    text, calls, outcome = [], [], None
    for item in events(reply, store=store, cancel=cancel):
        if isinstance(item, Outcome):
            outcome = item
        elif item.call is not None:
            calls.append(item.call)
        elif item.name is None and item.args is None:
            text.append(item.text)
    return Completion("".join(text), calls, outcome)


__all__ = [
    "Completion", "Event", "JsonFormat", "Outcome", "Reply", "complete", "events", "json_format",
    "language_model",
]  # fmt: skip
