"""Tool calling: tools rendered through the chat template, calls parsed from generated text
(tags, bare JSON; malformed or unknown: invalid, never an exception), split from streamed text,
and `tool_choice` enforced by the decoded prefix."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from langchain_agentmem import ChatAgentMem, _render
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from agentmem.chat import engine as _engine
from agentmem.chat import render as _chat_render
from agentmem.chat.tools import (
    OPEN,
    NameTrie,
    ToolSplitter,
    bare_call_openers,
    bare_calls,
    closing_args,
    parse_call,
)

NAMES = ["get_weather", "get_time", "add"]


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny in {city}"


@tool
def get_time(zone: str) -> str:
    """The time in a time zone."""
    return "12:00"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = [get_weather, get_time, add]


def split(text: str, names=NAMES, step: int | None = None, parse: bool = True):
    """(text, calls) of `text` fed whole, or `step` characters at a time."""
    splitter = ToolSplitter(names, parse=parse)
    events = []
    if step is None:
        events += splitter.feed(text)
    else:
        for i in range(0, len(text), step):
            events += splitter.feed(text[i : i + step])
    events += splitter.finish()
    return "".join(e.text for e in events), [e.call for e in events if e.call is not None]


# -- parsing ---------------------------------------------------------------------------------


def test_a_tagged_call_is_parsed_and_the_text_around_it_kept():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text += "\n</tool_call>"
    content, calls = split(text)
    assert content == "Let me check."
    assert [(c["type"], c["name"], c["args"]) for c in calls] == [
        ("tool_call", "get_weather", {"city": "Paris"})
    ]
    assert calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_streamed_pieces_split_exactly_as_the_whole_text(step):
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    whole = split(text)
    pieces = split(text, step=step)
    assert pieces[0] == whole[0] == "Sure."
    strip = [[(c["name"], c["args"]) for c in calls] for calls in (whole[1], pieces[1])]
    assert strip[0] == strip[1] == [("add", {"a": 1, "b": 2}), ("get_time", {"zone": "UTC"})]


def test_plain_text_streams_unchanged_and_whole():
    text = "The answer is 42.\n\nIt was <tool> a <tool_ thing {not json} done.  "
    assert split(text, step=1) == (text, [])
    assert split(text, parse=False) == (text, [])


def test_a_bare_json_call_without_tags_is_a_call():
    content, calls = split('{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert content == "" and calls[0]["name"] == "get_weather"
    assert calls[0]["args"] == {"city": "Oslo"}
    fenced = '```json\n{"name": "add", "parameters": {"a": 2, "b": 3}}\n```'
    assert split(fenced)[1][0]["args"] == {"a": 2, "b": 3}
    assert bare_calls('{"answer": 42}', NAMES) is None  # JSON, but no call: text
    assert split('{"answer": 42}') == ('{"answer": 42}', [])


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Par', "not JSON"),
        ('{"name": "send_email", "arguments": {"to": "x"}}', "unknown tool"),
        ('{"name": "add", "arguments": [1, 2]}', "arguments must be a JSON object"),
        ('["add"]', "a tool call is"),
    ],
)
def test_malformed_or_unknown_calls_are_invalid_never_raised(body, error):
    call = parse_call(body, NAMES)
    assert call["type"] == "invalid_tool_call" and error in call["error"]
    content, calls = split(f"{OPEN}\n{body}")  # unterminated, as when max_tokens cut it
    assert content == "" and calls[0]["type"] == "invalid_tool_call"


def test_arguments_given_as_a_json_string_are_read():
    call = parse_call('{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', NAMES)
    assert call["type"] == "tool_call" and call["args"] == {"a": 1, "b": 2}


# -- binding and rendering ---------------------------------------------------------------------


@pytest.fixture
def llm(tiny_model_dir) -> ChatAgentMem:
    return ChatAgentMem(model=tiny_model_dir, max_tokens=12)


def test_bound_tools_are_rendered_through_the_chat_template(llm, tiny_model_dir):
    bound = llm.bind_tools(TOOLS)
    bound.invoke([HumanMessage("What is the weather in Paris?")], session_id="render")
    (th,) = _engine._threads.values()
    system = th.session.messages()[0].text
    schema = json.dumps(bound.kwargs["tools"][0], ensure_ascii=False)
    assert system.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert schema in system and '"name": "get_weather"' in schema
    assert "get_time" in system and '"name": "add"' in system


def test_tool_choice_must_name_a_bound_tool(llm):
    with pytest.raises(ValueError, match="names no bound tool"):
        llm.bind_tools(TOOLS, tool_choice="send_email")
    with pytest.raises(ValueError, match="needs tools"):
        llm.invoke("hi", tool_choice="any")


def test_a_named_tool_choice_forces_that_call(llm):
    bound = llm.bind_tools(TOOLS, tool_choice="get_time")
    reply = bound.invoke("What is the weather?", session_id="forced")
    calls = reply.tool_calls + reply.invalid_tool_calls
    assert len(calls) >= 1 and calls[0]["name"] == "get_time"
    # What the model continued from: the assistant turn opened with the call's head.
    (th,) = _engine._threads.values()
    text = th.session.lm.tokenizer.decode(th.held)
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments":' in text


@pytest.mark.parametrize("choice", ["any", "required", True])
def test_any_forces_a_call_of_a_bound_tool(llm, choice):
    for question in ("hello", "What is the weather in Paris?", "Add 2 and 3."):
        reply = llm.bind_tools(TOOLS, tool_choice=choice).invoke(question, temperature=1.0, seed=5)
        calls = reply.tool_calls + reply.invalid_tool_calls
        assert calls and calls[0]["name"] in NAMES  # the name was constrained to the tools


def test_the_name_trie_allows_only_bound_names(tiny_model_dir):
    tok = _engine.language_model(tiny_model_dir).tokenizer
    trie = NameTrie(tok, NAMES)
    first = trie([])
    starts = {seq[0] for seq in trie.sequences}
    assert set(first) == starts
    seq = trie.sequences[1]
    assert trie(seq[:1]) is not None and seq[1] in trie(seq[:1])
    assert trie(seq) is None and trie([*seq, 5, 6]) is None  # the name done: arguments free


def test_tool_choice_none_never_decodes_the_call_tag(llm, tiny_model_dir):
    tok = _engine.language_model(tiny_model_dir).tokenizer
    tag = tok(OPEN, add_special_tokens=False).input_ids
    assert len(tag) == 1
    for seed in range(4):
        reply = llm.bind_tools(TOOLS, tool_choice="none").invoke(
            "call a tool", temperature=3.0, top_k=0, seed=seed, max_tokens=24
        )
        assert OPEN not in reply.content and not reply.tool_calls


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_a_reply_never_opens_with_bare_json_while_tools_are_bound(llm, tiny_model_dir, choice):
    """A call is written in its tags (auto) or not at all (none): sampled wildly from a random
    model, no reply's first token opens a JSON object or a code fence."""
    tok = _engine.language_model(tiny_model_dir).tokenizer
    openers = bare_call_openers(tok)
    assert tok("{", add_special_tokens=False).input_ids[0] in openers
    assert tok("Sure", add_special_tokens=False).input_ids[0] not in openers
    for seed in range(6):
        reply = llm.bind_tools(TOOLS, tool_choice=choice).invoke(
            "call a tool", temperature=5.0, top_k=0, seed=seed, max_tokens=1
        )
        written = reply.additional_kwargs.get("agentmem", {}).get("text", reply.content)
        assert not written.lstrip().startswith(("{", "`")), written


def test_streaming_with_tools_yields_text_and_tool_call_chunks(llm):
    bound = llm.bind_tools(TOOLS, tool_choice="add")
    chunks = list(bound.stream("Add 2 and 3."))
    with_calls = [c for c in chunks if c.tool_call_chunks]
    assert with_calls and with_calls[0].tool_call_chunks[0]["name"] == "add"
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    invoked = bound.invoke("Add 2 and 3.")
    streamed = [c["name"] for c in whole.tool_calls + whole.invalid_tool_calls]
    assert streamed == [c["name"] for c in invoked.tool_calls + invoked.invalid_tool_calls]
    assert len(whole.tool_calls) == len(invoked.tool_calls)  # valid in one, valid in both
    assert whole.content == invoked.content


def test_a_forced_call_with_the_real_tags_parses_when_the_model_writes_json():
    # What the forced head plus a well-behaved continuation gives (the tiny model writes
    # noise; the real model's run is in the integration tests).
    head = '<tool_call>\n{"name": "get_weather", "arguments":'
    content, calls = split(head + ' {"city": "Paris"}}\n</tool_call>')
    assert content == "" and calls[0]["args"] == {"city": "Paris"}


class Person(BaseModel):
    """A person."""

    name: str = Field(description="their name")
    age: int


def test_structured_output_binds_the_schema_as_a_forced_tool(llm):
    structured = llm.with_structured_output(Person, include_raw=True)
    out = structured.invoke("Alice is 30.")
    raw = out["raw"]
    calls = raw.tool_calls + raw.invalid_tool_calls
    assert calls and calls[0]["name"] == "Person"  # forced: tool_choice "any", one tool
    assert out["parsed"] is None or isinstance(out["parsed"], Person)


def test_history_with_tool_calls_renders_like_the_template(tiny_model_dir):
    from langchain_core.messages import AIMessage, ToolMessage

    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}
    messages = [
        HumanMessage("1+2?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("3", tool_call_id="c1"),
        ToolMessage("also 3", tool_call_id="c1"),
    ]
    dicts = _render.template_messages(messages)
    assert dicts[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert dicts[2] == {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"}
    tok = _engine.language_model(tiny_model_dir).tokenizer
    pieces = _chat_render.pieces(tok, dicts, None)
    whole = tok.apply_chat_template(dicts, add_generation_prompt=True, tokenize=False)
    assert "".join(p.text for p in pieces) == whole
    # Qwen's template joins consecutive tool results into one user turn: one piece for both.
    tool_pieces = [p for p in pieces if "<tool_response>" in p.text]
    assert len(tool_pieces) == 1 and tool_pieces[0].role == "tool"
    assert tool_pieces[0].text.count("<tool_response>") == 2


def test_the_call_grammar_closes_a_complete_call_and_then_ends(tiny_model_dir):
    from agentmem.chat.tools import CLOSE, CallCloser, CallGrammar

    tok = _engine.language_model(tiny_model_dir).tokenizer
    open_id, close_id = tok.convert_tokens_to_ids([OPEN, CLOSE])
    eos = _engine.eos_ids(_engine.language_model(tiny_model_dir))
    head = '<tool_call>\n{"name": "add", "arguments":'
    grammar = CallGrammar(tok, open_id, close_id, eos, head=head, single=True)

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    assert grammar(ids(' {"a": 1')) is None  # the object is being written: free
    newline = ids("\n")[:1]
    assert grammar(ids(' {"a": 1, "b": "}"}}')) == newline  # a brace in a string is no end
    assert grammar(ids(' {"a": 1}}\n')) == [close_id]
    assert grammar(ids(' {"a": 1}}') + [close_id]) == sorted(eos)  # forced: one call, the end
    free = CallGrammar(tok, open_id, close_id, eos)
    assert free(ids("Sure, ")) is None  # text without a call
    assert free(ids("<tool_call>\nno json")) == [close_id]  # not an object: closed at once
    after = free(ids('<tool_call>\n{"name": "add", "arguments": {}}\n') + [close_id])
    assert set(after) == set(eos) | set(newline)  # another call, or the end
    closer = CallCloser(open_id, close_id, eos, open=True)
    assert set(closer([])) == set(eos) and closer([close_id]) == ()


def test_a_forced_tool_without_parameters_is_called_with_empty_arguments(llm):
    @tool
    def magic_time() -> str:
        """What time it is, magically."""
        return "noon"

    for choice in ("magic_time", "any"):
        reply = llm.bind_tools([magic_time], tool_choice=choice).invoke("What time is it?")
        assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("magic_time", {})]
        assert reply.usage_metadata["output_tokens"] == 1  # nothing left but the end


# -- tool calls streamed as they decode ----------------------------------------------------------


@tool
def set_light(room: Literal["kitchen", "hall"], on: bool) -> str:
    """Switch the light of a room on or off."""
    return "done"


def test_a_call_streams_its_name_then_its_arguments_as_they_decode():
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    splitter = ToolSplitter(NAMES)
    events = [e for ch in text for e in splitter.feed(ch)] + splitter.finish()
    at = next(i for i, e in enumerate(events) if e.name is not None)
    assert "".join(e.text for e in events[:at]) == "Sure."  # streamed as text, before the call
    begun = events[at]
    assert (begun.name, begun.index, begun.call) == ("add", 0, None) and begun.id
    pieces = [e.args for e in events[at + 1 : -1]]
    assert len(pieces) > 5 and "".join(pieces) == '{"a": 1, "b": 2}'  # not the call's own `}`
    done = events[-1]
    assert done.call["args"] == {"a": 1, "b": 2} and done.call["id"] == begun.id
    assert done.streamed == '{"a": 1, "b": 2}'
    assert closing_args(done.call, done.streamed, "add") == ""  # the pieces say it all


def test_a_call_of_an_unknown_tool_or_without_an_object_comes_whole():
    for body in ('{"name": "send", "arguments": {"to": "x"}}', '{"name": "add", "arguments": 3}'):
        splitter = ToolSplitter(NAMES)
        events = [e for ch in f"{OPEN}\n{body}\n</tool_call>" for e in splitter.feed(ch)]
        assert [e.call["type"] for e in events] == ["invalid_tool_call"]
        assert events[0].streamed is None


def sum_chunks(chunks):
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    return whole


@pytest.mark.parametrize("choice", ["set_light", "any", "auto"])
def test_streamed_call_chunks_come_in_pieces_and_sum_to_the_invoked_call(llm, choice):
    bound = llm.bind_tools([set_light, add], tool_choice=choice)
    asked = "Switch on the kitchen light."
    invoked = bound.invoke(asked, max_tokens=40)
    chunks = list(bound.stream(asked, max_tokens=40))
    pieces = [p for c in chunks for p in c.tool_call_chunks]
    if choice == "auto" and not invoked.tool_calls:  # the tiny model chose text: text it is
        assert not pieces and sum_chunks(chunks).content == invoked.content
        return
    first, *rest = pieces
    assert first["name"] == "set_light" and first["id"] and first["args"] == ""
    assert len(rest) > 5  # the arguments, a piece per token or so
    assert all(p["name"] is None and p["id"] is None for p in rest)
    assert {p["index"] for p in pieces} == {0}  # one call: LangChain merges them by index
    whole = sum_chunks(chunks)
    (call,) = whole.tool_calls
    assert call["id"] == first["id"] and not whole.invalid_tool_calls
    assert [(c["name"], c["args"]) for c in invoked.tool_calls] == [(call["name"], call["args"])]
    assert call["args"]["room"] in ("kitchen", "hall") and isinstance(call["args"]["on"], bool)
    assert whole.content == invoked.content


def test_a_streamed_call_cut_short_is_invalid_in_the_sum_as_in_invoke(llm):
    bound = llm.bind_tools([set_light], tool_choice="set_light")
    invoked = bound.invoke("Light?", max_tokens=6)  # cut inside the arguments
    assert not invoked.tool_calls and invoked.invalid_tool_calls
    chunks = list(bound.stream("Light?", max_tokens=6))
    streamed = "".join(p["args"] for c in chunks[:-2] for p in c.tool_call_chunks)
    assert streamed.startswith("{")  # the arguments streamed as they decoded...
    whole = sum_chunks(chunks)
    assert not whole.tool_calls  # ...and LangChain, which would close them, reads them invalid
    assert [c["name"] for c in whole.invalid_tool_calls] == ["set_light"]
