"""Tool calls in generated text (the Hermes / Qwen format: `<tool_call>{json}</tool_call>`, or a
bare JSON object where a small model drops the tags), split from the text as it streams (a
call's arguments too, as they decode); what `tool_choice` forces (a decoded prefix, a trie of
allowed tool names)."""

from __future__ import annotations

import json
import re
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentmem.chat.json_grammar import JsonGrammar, scan, tokens_holding

# Calls as dicts in the shapes LangChain's messages hold them (`ToolCall`, `InvalidToolCall`,
# `ToolCallChunk`), which the server turns into OpenAI's.
ToolCall = InvalidToolCall = ToolCallChunk = dict


def tool_call(*, name: str, args: dict, id: str | None) -> ToolCall:
    return {"name": name, "args": args, "id": id, "type": "tool_call"}


def invalid_tool_call(*, name: str | None, args: str | None, id: str | None,
                      error: str | None) -> InvalidToolCall:  # fmt: skip
    return {"name": name, "args": args, "id": id, "error": error, "type": "invalid_tool_call"}


def tool_call_chunk(*, name: str | None, args: str | None, id: str | None,
                    index: int | None) -> ToolCallChunk:  # fmt: skip
    return {"name": name, "args": args, "id": id, "index": index, "type": "tool_call_chunk"}


OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The text a forced call starts with, up to the tool's name (Qwen2.5's template says so).
CALL_HEAD = OPEN + '\n{"name": "'
NAME_TAIL = '", "arguments":'
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
# A call's body up to its arguments (the tool's name in group 1); HEAD: up to their object,
# from where they stream as they decode.
NAMED = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')
HEAD = re.compile(NAMED.pattern + r"\s*(?=\{)")


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


def parse_call(
    body: str, names: Iterable[str], id: str | None = None
) -> ToolCall | InvalidToolCall:
    """One call's JSON `{"name": ..., "arguments": {...}}` (arguments also as "parameters", or
    as a JSON string); malformed JSON or an unknown tool gives an invalid call, never raises.
    `id`: the call's (one streamed already has it), else a new one."""
    names = set(names)
    id = id or new_id()
    body = body.strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        error = f"not JSON: {e}"
        return invalid_tool_call(name=_name_in(body), args=body, id=id, error=error)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        error = 'a tool call is {"name": ..., "arguments": ...}'
        return invalid_tool_call(name=None, args=body, id=id, error=error)
    name = value["name"]
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        error = "arguments must be a JSON object"
        return invalid_tool_call(name=name, args=json.dumps(args), id=id, error=error)
    if name not in names:
        error = f"unknown tool {name!r} (bound: {', '.join(sorted(names)) or 'none'})"
        return invalid_tool_call(name=name, args=json.dumps(args), id=id, error=error)
    return tool_call(name=name, args=args, id=id)


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
    """What the splitter found: text to show; a call begun (`name` and `id`: its arguments
    follow as `args` pieces); or a complete call, valid or not (`call`, and `streamed`: the
    arguments sent in pieces before, None if none were). A call's events share its `index`."""

    text: str = ""
    call: ToolCall | InvalidToolCall | None = None
    index: int = 0
    name: str | None = None
    id: str | None = None
    args: str | None = None
    streamed: str | None = None


@dataclass
class ToolSplitter:
    """Splits generated text, fed as it streams, into text and tool calls.

    Text outside calls streams at once, except what could be the start of a `<tool_call>` tag
    and trailing whitespace (dropped before a call and at the end of a reply with calls, as the
    template renders it). A call of a bound tool written as the template writes it
    (`{"name": ..., "arguments": {`) begins once its name is written, and its arguments' object
    streams as it decodes; any other call comes whole when it ends. A reply that starts with `{`
    or a code fence is held to the end: it may be a bare JSON call. `parse=False` (tool_choice
    "none"): everything is text.
    """

    names: Sequence[str]
    parse: bool = True
    _buffer: str = ""
    _held_ws: str = ""
    _state: str = "start"  # start | text | call | bare
    _calls: int = 0
    _shown: bool = field(default=False)
    # The call being written: None (not begun), False (not streamed) or {name, id, at, sent}:
    # where its arguments start in the body and how many characters of them were sent.
    _live: dict | bool | None = None

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
                    keep = _partial_tail(self._buffer, CLOSE)
                    self._stream(self._buffer[: len(self._buffer) - keep], events)
                    return events
                self._stream(self._buffer[:end], events)
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

    def _stream(self, body: str, events: list[Event]) -> None:
        """The begun call's name once written, then its arguments as far as written (up to
        where their object ends: the body's own closing brace is not theirs)."""
        if self._live is None:
            head = HEAD.match(body)
            if head is None:
                return
            name = _string(head.group(1))
            if name not in self.names:  # an unknown tool: the invalid call comes whole
                self._live = False
                return
            self._live = {"name": name, "id": new_id(), "at": head.end(), "sent": 0}
            events.append(Event(name=name, id=self._live["id"], index=self._calls))
        if not self._live:
            return
        args = body[self._live["at"] :]
        end = object_end(args)
        upto = len(args) if end is None else end
        if upto > self._live["sent"]:
            events.append(Event(args=args[self._live["sent"] : upto], index=self._calls))
            self._live["sent"] = upto

    def _call(self, body: str) -> Event:
        live, self._live = self._live or None, None
        if live is None:
            event = Event(call=parse_call(body, self.names), index=self._calls)
        else:
            call = parse_call(body, self.names, id=live["id"])
            streamed = body[live["at"] : live["at"] + live["sent"]]
            event = Event(call=call, index=self._calls, name=live["name"], streamed=streamed)
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
            self._stream(self._buffer, events)
            events.append(self._call(self._buffer))
        elif self._buffer:
            self._text(self._buffer, events)
        self._buffer = ""
        if self._held_ws and not self._calls:
            events.append(Event(text=self._held_ws))
        self._held_ws = ""
        return events


def _string(escaped: str) -> str:
    """A JSON string's contents (between its quotes) as text."""
    try:
        return json.loads(f'"{escaped}"')
    except json.JSONDecodeError:
        return escaped


def closing_args(call: ToolCall | InvalidToolCall, streamed: str, name: str) -> str:
    """What to send after a call's `streamed` arguments so that LangChain's sum of the chunks
    reads the call as `invoke` does: nothing when they are the call's; else (the call turned
    out invalid: cut short, malformed) a tail LangChain reads as malformed. Its reading is
    lenient (`parse_partial_json` closes what is left open), but a closing bracket that does
    not match fails it, and the call is then invalid there too."""
    if call["type"] == "tool_call" and call["name"] == name:
        try:
            if json.loads(streamed) == call["args"]:
                return ""
        except json.JSONDecodeError:
            pass
    in_string, escaped, stack = False, False, []  # as parse_partial_json reads them
    for ch in streamed:
        if in_string:
            if ch == '"' and not escaped:
                in_string = False
            elif ch == "\\":
                escaped = not escaped
            else:
                escaped = False
        elif ch == '"':
            in_string, escaped = True, False
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack and stack[-1] == ch:
            stack.pop()
    tail = (("n" if escaped else "") + '"') if in_string else ""
    return tail + ("}" if stack and stack[-1] == "]" else "]")


def call_chunks(event: Event) -> list[ToolCallChunk]:
    """The tool-call chunks a call's event streams as (LangChain sums those of one `index` into
    the call): its name and id once begun; each piece of its arguments; at its end, what makes
    the sum read as `invoke`'s call: nothing after pieces that say it all, `closing_args` after
    those of a call that turned out invalid, or the whole call where none were streamed (an
    invalid one's args as a JSON string, which the sum also reads as invalid: LangChain parses
    args leniently)."""
    index, call = event.index, event.call
    if call is None:
        if event.name is not None:
            return [tool_call_chunk(name=event.name, args="", id=event.id, index=index)]
        return [tool_call_chunk(name=None, args=event.args, id=None, index=index)]
    if event.streamed is not None:
        tail = closing_args(call, event.streamed, event.name)
        return [tool_call_chunk(name=None, args=tail, id=None, index=index)] if tail else []
    whole = call["args"] if call["type"] == "tool_call" else call.get("args") or ""
    args = json.dumps(whole, ensure_ascii=False)
    return [tool_call_chunk(name=call.get("name"), args=args, id=call.get("id"), index=index)]


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
    unclosed call back it calls again instead of answering. With `openers`, the reply may not
    open with them either (`bare_call_openers`: a bare or fenced JSON call)."""

    def __init__(self, open_id: int, close_id: int, eos: Iterable[int], *, open: bool,
                 openers: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.open_id, self.close_id, self.eos = open_id, close_id, tuple(eos)
        self.opened = int(open)
        self.openers = tuple(openers)

    def __call__(self, generated: list[int]) -> tuple[int, ...]:
        if not generated and not self.opened:
            return self.openers
        depth = self.opened + generated.count(self.open_id) - generated.count(self.close_id)
        return self.eos if depth > 0 else ()


_openers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bare_call_openers(tokenizer) -> frozenset[int]:
    """The ids of tokens that open a bare or fenced JSON object (`{`, ` {`, ```` ``` ````...). The
    0.5B model often writes its calls that way; rendered back through the template as proper
    calls, the next turn's history no longer matches memory (a new branch), and the model, shown
    its call in tags, repeats it as bare JSON instead of answering. Computed once a tokenizer."""
    if tokenizer not in _openers:
        near, texts = tokens_holding(tokenizer, "{`")
        _openers[tokenizer] = frozenset(
            i for i, text in zip(near, texts, strict=True) if text.lstrip().startswith(("{", "`"))
        )
    return _openers[tokenizer]


def object_end(text: str) -> int | None:
    """Where the JSON object `text` starts with (after whitespace) ends; None while it is open,
    -1 if `text` does not start with one."""
    found = scan(text)
    return found.end if found.ok else -1


class CallGrammar:
    """`Sampling.allowed` for replies that call tools: a forced call's name from the bound ones
    (`NameTrie`); a bound tool's arguments an object (` {`) whose keys and listed values are its
    parameters' (`args`: a `JsonGrammar` per tool name), closed by the call's `}`; once a call's
    JSON object is complete, nothing but its closing `\n</tool_call>`; after a call, another
    call or the end (`single`, a forced call: the end); a call that does not start with an
    object is closed at once. The 0.5B model otherwise ends at the object without closing it,
    or rambles on after the call."""

    def __init__(self, tokenizer, open_id: int, close_id: int, eos: Iterable[int], *,
                 head: str = "", names: NameTrie | None = None, single: bool = False,
                 args: dict[str, JsonGrammar] | None = None) -> None:  # fmt: skip
        self.tokenizer, self.head, self.names, self.single = tokenizer, head, names, single
        self.args = args or {}
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
        if end is None:  # the object is still being written
            return self._arguments(body)
        if end < 0:
            return [self.close_id]  # no object: close the (invalid) call now
        rest = body[end:]
        if rest and self.tail.startswith(rest) and rest != self.tail:
            return self._first(self.tail[len(rest) :])
        if not rest:
            return self._first(self.tail)
        return [self.close_id]

    def _arguments(self, body: str) -> list[int] | None:
        """While a call of a bound tool is open: its arguments as its schema constrains them."""
        named = NAMED.match(body)
        grammar = self.args.get(_string(named.group(1))) if named else None
        if grammar is None:
            return None
        args = body[named.end() :]
        if not args.strip():  # the template's ` {`, with the first key
            return grammar.first_ids(grammar.opening("" if args else " "))
        found = scan(args)
        if found.ok and found.end is not None and not args[found.end :]:
            return self._first("}")  # the arguments are complete: the call's object closes
        return grammar.inside(found)

    def _first(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids[:1]
