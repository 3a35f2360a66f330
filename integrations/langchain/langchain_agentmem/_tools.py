"""Tool calls in generated text (the Hermes / Qwen format: `<tool_call>{json}</tool_call>`, or a
bare JSON object where a small model drops the tags), split from the text as it streams; what
`tool_choice` forces (a decoded prefix, a trie of allowed tool names)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The text a forced call starts with, up to the tool's name (Qwen2.5's template says so).
CALL_HEAD = OPEN + '\n{"name": "'
NAME_TAIL = '", "arguments":'
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def hermes_template(tokenizer) -> bool:
    """Whether the model's chat template calls tools in `<tool_call>` tags."""
    return OPEN in str(getattr(tokenizer, "chat_template", "") or "")


def chosen_tool(tool_choice: Any, names: Sequence[str]) -> str | None:
    """`tool_choice` as "auto", "none", "any" or the one tool's name it forces; raises for a
    choice that names no bound tool."""
    if tool_choice is None or tool_choice is False or tool_choice == "auto":
        return "auto"
    if tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "any"
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if not isinstance(name, str) or name not in names:
        raise ValueError(
            f"tool_choice {tool_choice!r} names no bound tool ({', '.join(names) or 'none bound'});"
            ' use "auto", "none", "any" or one of their names'
        )
    return name


def parse_call(body: str, names: Iterable[str]) -> ToolCall | InvalidToolCall:
    """One call's JSON `{"name": ..., "arguments": {...}}` (arguments also as "parameters", or
    as a JSON string); malformed JSON or an unknown tool gives an invalid call, never raises."""
    names = set(names)
    body = body.strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        error = f"not JSON: {e}"
        return invalid_tool_call(name=_name_in(body), args=body, id=new_id(), error=error)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        error = 'a tool call is {"name": ..., "arguments": ...}'
        return invalid_tool_call(name=None, args=body, id=new_id(), error=error)
    name = value["name"]
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        error = "arguments must be a JSON object"
        return invalid_tool_call(name=name, args=json.dumps(args), id=new_id(), error=error)
    if name not in names:
        error = f"unknown tool {name!r} (bound: {', '.join(sorted(names)) or 'none'})"
        return invalid_tool_call(name=name, args=json.dumps(args), id=new_id(), error=error)
    return tool_call(name=name, args=args, id=new_id())


def _name_in(body: str) -> str | None:
    found = re.search(r'"name"\s*:\s*"([^"]*)"', body)
    return found.group(1) if found else None


def bare_calls(text: str, names: Iterable[str]) -> list[ToolCall | InvalidToolCall] | None:
    """The calls in a whole reply that is only a JSON object (or a list of them, or one fenced
    as ```json) naming a tool, as small models write them without tags; else None."""
    stripped = text.strip()
    fenced = FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in items):
        return None
    if not all("arguments" in v or "parameters" in v for v in items):
        return None
    return [parse_call(json.dumps(v), names) for v in items]


@dataclass
class Event:
    """What the splitter found: text to show, or a complete tool call (valid or not)."""

    text: str = ""
    call: ToolCall | InvalidToolCall | None = None
    index: int = 0


@dataclass
class ToolSplitter:
    """Splits generated text, fed as it streams, into text and tool calls.

    Text outside calls streams at once, except what could be the start of a `<tool_call>` tag
    and trailing whitespace (dropped before a call and at the end of a reply with calls, as the
    template renders it). A reply that starts with `{` or a code fence is held to the end: it
    may be a bare JSON call. `parse=False` (tool_choice "none"): everything is text.
    """

    names: Sequence[str]
    parse: bool = True
    _buffer: str = ""
    _held_ws: str = ""
    _state: str = "start"  # start | text | call | bare
    _calls: int = 0
    _shown: bool = field(default=False)

    def feed(self, delta: str) -> list[Event]:
        self._buffer += delta
        return self._drain()

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._state == "start":
                stripped = self._buffer.lstrip()
                if not stripped:
                    return events
                if self.parse and stripped[0] in "{`":
                    self._state = "bare"
                    return events
                self._state = "text"
            if self._state == "bare":
                return events
            if self._state == "text":
                at = self._buffer.find(OPEN) if self.parse else -1
                if at < 0:
                    keep = _partial_tail(self._buffer, OPEN) if self.parse else 0
                    self._text(self._buffer[: len(self._buffer) - keep], events)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return events
                self._text(self._buffer[:at], events)
                self._held_ws = ""  # whitespace before a call is the template's
                self._buffer = self._buffer[at + len(OPEN) :]
                self._state = "call"
            if self._state == "call":
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return events
                events.append(self._call(self._buffer[:end]))
                self._buffer = self._buffer[end + len(CLOSE) :]
                self._state = "text"

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        body = text.rstrip()
        if body:
            events.append(Event(text=self._held_ws + body))
            self._held_ws = ""
            self._shown = True
        self._held_ws += text[len(body) :]

    def _call(self, body: str) -> Event:
        event = Event(call=parse_call(body, self.names), index=self._calls)
        self._calls += 1
        return event

    def finish(self) -> list[Event]:
        """What remains once generation ended."""
        events: list[Event] = []
        if self._state == "bare":
            calls = bare_calls(self._buffer, self.names)
            if calls is not None:
                for call in calls:
                    events.append(Event(call=call, index=self._calls))
                    self._calls += 1
                self._buffer = ""
                return events
            self._state = "text"  # the held reply was text after all
            events.extend(self._drain())
        if self._state == "call":  # an unterminated call: what the model wrote of it
            events.append(self._call(self._buffer))
        elif self._buffer:
            self._text(self._buffer, events)
        self._buffer = ""
        if self._held_ws and not self._calls:
            events.append(Event(text=self._held_ws))
        self._held_ws = ""
        return events


def _partial_tail(text: str, tag: str) -> int:
    """How many last characters of `text` could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class NameTrie:
    """Token sequences of `<name>", "arguments":` for each tool: the ids the next generated
    token may be, given those generated so far, until one sequence is complete (then any)."""

    def __init__(self, tokenizer, names: Sequence[str]) -> None:
        self.sequences = [
            tokenizer(name + NAME_TAIL, add_special_tokens=False).input_ids for name in names
        ]

    def __call__(self, generated: list[int]) -> list[int] | None:
        n = len(generated)
        if any(n >= len(seq) and generated[: len(seq)] == seq for seq in self.sequences):
            return None  # a tool's name is written: the arguments are free
        nxt = {seq[n] for seq in self.sequences if len(seq) > n and seq[:n] == generated}
        return sorted(nxt) or None


def is_open(text: str) -> bool:
    """Whether `text` ends inside a tool call."""
    return text.rfind(OPEN) > text.rfind(CLOSE)


class CallCloser:
    """`Sampling.forbid`: no end of sequence while a `<tool_call>` the reply opened (or its forced
    head did) is not closed; a small model otherwise ends right after the JSON, and reading its
    unclosed call back it calls again instead of answering."""

    def __init__(self, open_id: int, close_id: int, eos: Iterable[int], *, open: bool) -> None:
        self.open_id, self.close_id, self.eos = open_id, close_id, tuple(eos)
        self.opened = int(open)

    def __call__(self, generated: list[int]) -> tuple[int, ...]:
        depth = self.opened + generated.count(self.open_id) - generated.count(self.close_id)
        return self.eos if depth > 0 else ()


def object_end(text: str) -> int | None:
    """Where the JSON object `text` starts with (after whitespace) ends; None while it is open,
    -1 if `text` does not start with one."""
    i = len(text) - len(text.lstrip())
    if i == len(text):
        return None
    if text[i] != "{":
        return -1
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        ch = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


class CallGrammar:
    """`Sampling.allowed` for replies that call tools: a forced call's name from the bound ones
    (`NameTrie`); once a call's JSON object is complete, nothing but its closing
    `\n</tool_call>`; after a call, another call or the end (`single`, a forced call: the end);
    a call that does not start with an object is closed at once. The 0.5B model otherwise ends
    at the object without closing it, or rambles on after the call."""

    def __init__(self, tokenizer, open_id: int, close_id: int, eos: Iterable[int], *,
                 head: str = "", names: NameTrie | None = None, single: bool = False,
                 ) -> None:  # fmt: skip
        self.tokenizer, self.head, self.names, self.single = tokenizer, head, names, single
        self.open_id, self.close_id, self.eos = open_id, close_id, sorted(eos)
        self.tail = "\n" + CLOSE
        self.newline = tokenizer("\n", add_special_tokens=False).input_ids[:1]

    def __call__(self, generated: list[int]) -> list[int] | None:
        if self.names is not None:
            ids = self.names(generated)
            if ids is not None:
                return ids
        text = self.head + self.tokenizer.decode(generated, skip_special_tokens=True)
        at = text.rfind(OPEN)
        if at < 0:
            return None  # no call: text
        closed = text.find(CLOSE, at)
        if closed >= 0:  # after a call: another call, or the end of the reply
            after = text[closed + len(CLOSE) :]
            if after == "":
                return list(self.eos) if self.single else [*self.eos, *self.newline]
            return [self.open_id] if after == "\n" else None
        body = text[at + len(OPEN) :]
        end = object_end(body)
        if end is None:
            return None  # the object is still being written
        if end < 0:
            return [self.close_id]  # no object: close the (invalid) call now
        rest = body[end:]
        if rest and self.tail.startswith(rest) and rest != self.tail:
            ids = self.tokenizer(self.tail[len(rest) :], add_special_tokens=False).input_ids
            return ids[:1]
        if not rest:
            return self.tokenizer(self.tail, add_special_tokens=False).input_ids[:1]
        return [self.close_id]
