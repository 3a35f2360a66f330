"""Structured output on the tiny model: `with_structured_output` by function calling, JSON schema
and JSON mode, each enforced while the reply decodes (one JSON object; a schema's keys and
listed values), parsed into pydantic instances or dicts, failures reported as LangChain does."""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest
from langchain_agentmem import ChatAgentMem
from langchain_agentmem._structured import JsonReplyParser
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from pydantic import BaseModel, field_validator
from typing_extensions import TypedDict

from agentmem.chat import engine as _engine
from agentmem.chat.json_grammar import JsonGrammar, opening_ids, scan

ASK = "What is the weather in Paris?"


class Weather(BaseModel):
    """The weather somewhere."""

    sky: Literal["sunny", "rainy", "cloudy"]
    warm: bool


class WeatherDict(TypedDict):
    """The weather somewhere."""

    sky: Literal["sunny", "rainy", "cloudy"]
    warm: bool


class Picky(Weather):
    """Valid JSON that pydantic rejects."""

    @field_validator("sky")
    @classmethod
    def never(cls, value: str) -> str:
        raise ValueError(f"no sky is good enough, not even {value!r}")


@pytest.fixture
def llm(tiny_model_dir) -> ChatAgentMem:
    return ChatAgentMem(model=tiny_model_dir, max_tokens=40)


def tokenizer(model_dir):
    return _engine.language_model(model_dir).tokenizer


# -- the scan and the grammar -------------------------------------------------------------------


def test_the_scan_reads_keys_slots_values_and_the_end():
    text = '{"a": "x}, y", "b": [1, {"c": 2}], "'
    found = scan(text)
    assert found.ok and found.end is None  # braces and commas in strings and arrays: no end
    assert found.keys == ["a", "b"] and found.slot == ' "' and found.before == ","
    assert scan('{"a": tr').value == " tr" and scan('{"a": tr').keys == ["a"]
    assert scan('  {"a": {"b": 1}}} and more').end == len('  {"a": {"b": 1}}')
    assert scan("[1, 2]").ok is False and scan("   ").end is None


def test_the_grammar_allows_the_schema_keys_then_only_the_end(tiny_model_dir):
    tok = tokenizer(tiny_model_dir)
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    grammar = JsonGrammar(tok, eos, schema=Weather.model_json_schema())

    def ids(text):  # the reply so far, opened by `{` (the model's pick of `{`, `{"`, `{\n`...)
        return tok("{" + text, add_special_tokens=False).input_ids

    def first(text):
        return tok(text, add_special_tokens=False).input_ids[0]

    openings = [tok.decode([i]) for i in grammar([])]
    assert "{" in openings and all(o.startswith("{") and o.strip('{\n "') == "" for o in openings)
    assert grammar(ids("")) == sorted({first('"sky":'), first('"warm":')})
    assert grammar.forbid([]) == grammar.forbid(ids("")) == eos  # no end while it is open
    assert grammar(ids('"sky": "sun')) == [first('ny"')]  # an enum value, spelled out
    after = grammar(ids('"sky": "sunny"'))  # the required `warm` is left: a comma, no `}`
    assert after == [first(', "warm":')]
    assert grammar(ids('"sky": "sunny", "')) == [first('warm":')]  # `sky` is not repeated
    done = grammar(ids('"sky": "sunny", "warm": true'))
    assert first("}") in done
    assert grammar(ids('"sky": "sunny", "warm": true}')) == eos  # closed: the end only
    assert grammar.forbid(ids('"sky": "sunny", "warm": true}')) == []
    free = JsonGrammar(tok, eos)  # JSON mode: keys and values free, the end still held
    assert free(ids('"anything": ')) is None and free.forbid(ids('"x": 1')) == eos
    assert free([]) == opening_ids(tok)


# -- JSON mode and JSON schema on the model -----------------------------------------------------


def test_json_mode_replies_with_one_json_object(llm):
    bound = llm.bind(response_format={"type": "json_object"})
    for seed in range(4):
        reply = bound.invoke(ASK, temperature=1.0, seed=seed, session_id=f"json-{seed}")
        assert reply.content.startswith("{")
        found = scan(reply.content)
        if reply.response_metadata["finish_reason"] == "stop":  # it ended: the object closed
            assert found.end is not None
        else:  # cut by max_tokens: still open, the end was not decoded
            assert reply.usage_metadata["output_tokens"] == 40
    (th, *_) = _engine._threads.values()
    system = [m.text for m in th.session.messages() if "Reply with one JSON object" in m.text]
    assert system and system[0].startswith("<|im_start|>system\n")  # rendered by the template


def test_json_schema_gives_a_validated_pydantic_instance(llm):
    structured = llm.with_structured_output(Weather, method="json_schema", include_raw=True)
    out = structured.invoke(ASK)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Weather)
    raw = out["raw"]
    assert isinstance(raw, AIMessage) and not raw.tool_calls
    assert json.loads(raw.content) == out["parsed"].model_dump()  # the reply is the object
    assert raw.response_metadata["finish_reason"] == "stop"


@pytest.mark.parametrize("schema", [WeatherDict, Weather.model_json_schema()])
def test_a_typeddict_or_json_schema_gives_a_dict(llm, schema):
    parsed = llm.with_structured_output(schema, method="json_schema").invoke(ASK)
    assert isinstance(parsed, dict) and set(parsed) == {"sky", "warm"}
    assert parsed["sky"] in ("sunny", "rainy", "cloudy") and isinstance(parsed["warm"], bool)


def test_the_schema_is_given_to_the_model_after_the_history(llm):
    llm.with_structured_output(Weather, method="json_schema").invoke(ASK, session_id="schema")
    (th,) = _engine._threads.values()
    texts = [m.text for m in th.session.messages()]
    instruction = [t for t in texts if '"sunny"' in t and "JSON schema" in t]
    assert instruction and texts.index(instruction[0]) == len(texts) - 3  # after ASK
    assert texts[-2] == "<|im_start|>assistant\n"  # the generation prompt, then the reply
    assert texts[-1].startswith("{")
    assert any(ASK in t for t in texts[:-3])


def test_streamed_json_grows_to_the_invoked_object(llm):
    as_dicts = llm.with_structured_output(WeatherDict, method="json_schema")
    chunks = list(as_dicts.stream(ASK))
    assert len(chunks) > 1 and chunks[-1] == as_dicts.invoke(ASK)
    assert all(set(c) <= {"sky", "warm"} for c in chunks)
    as_models = llm.with_structured_output(Weather, method="json_schema")
    models = list(as_models.stream(ASK))
    assert models and all(isinstance(m, Weather) for m in models)  # only ones that validate
    assert models[-1] == as_models.invoke(ASK)


async def test_async_calls_give_the_same_objects(llm):
    structured = llm.with_structured_output(Weather, method="json_schema")
    assert await structured.ainvoke(ASK) == structured.invoke(ASK)
    streamed = [chunk async for chunk in structured.astream(ASK)]
    assert streamed and streamed[-1] == structured.invoke(ASK)


# -- failures ---------------------------------------------------------------------------------


def test_a_reply_cut_short_is_a_parsing_error(tiny_model_dir):
    short = ChatAgentMem(model=tiny_model_dir, max_tokens=3)
    structured = short.with_structured_output(Weather, method="json_schema", include_raw=True)
    out = structured.invoke(ASK)
    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputParserException)
    assert out["raw"].content.startswith("{") and "no JSON object" in str(out["parsing_error"])
    with pytest.raises(OutputParserException):
        short.with_structured_output(Weather, method="json_schema").invoke(ASK)


def test_json_that_the_schema_rejects_is_a_parsing_error(llm):
    out = llm.with_structured_output(Picky, method="json_schema", include_raw=True).invoke(ASK)
    assert json.loads(out["raw"].content)["sky"] in ("sunny", "rainy", "cloudy")  # valid JSON
    assert out["parsed"] is None and "not even" in str(out["parsing_error"])
    with pytest.raises(OutputParserException, match="does not fit Picky"):
        llm.with_structured_output(Picky, method="json_schema").invoke(ASK)


def test_dicts_are_checked_against_the_schema():
    parser = JsonReplyParser(json_schema=Weather.model_json_schema())
    assert parser.parse('{"sky": "rainy", "warm": false}') == {"sky": "rainy", "warm": False}
    for text, problem in [
        ('{"sky": "rainy"}', "lacks the required key(s) 'warm'"),
        ('{"sky": "rainy", "warm": 1}', "'warm' of type int, not boolean"),
        ('["sky"]', "is a JSON list, not an object"),
        ('{"sky": "rai', "no JSON object"),
    ]:
        with pytest.raises(OutputParserException, match=re.escape(problem)):
            parser.parse(text)
    optional = {"properties": {"n": {"type": "integer"}}, "required": []}
    assert JsonReplyParser(json_schema=optional).parse('{"n": null}') == {"n": None}
    with pytest.raises(OutputParserException, match="not integer"):
        JsonReplyParser(json_schema=optional).parse('{"n": true}')  # a bool is no integer


# -- function calling and the arguments ---------------------------------------------------------


def test_function_calling_forces_the_schema_as_a_tool(llm):
    out = llm.with_structured_output(Weather, include_raw=True).invoke(ASK)
    (call,) = out["raw"].tool_calls  # the schema's call, its arguments decoded by its keys
    assert call["name"] == "Weather" and out["parsing_error"] is None
    assert out["parsed"] == Weather(**call["args"])
    as_dict = llm.with_structured_output(Weather.model_json_schema()).invoke(ASK)
    assert as_dict == call["args"]


def test_bad_arguments_are_refused_where_they_enter(llm):
    with pytest.raises(ValueError, match="method must be one of"):
        llm.with_structured_output(Weather, method="xml")
    with pytest.raises(ValueError, match="needs a schema"):
        llm.with_structured_output(None, method="json_schema")
    with pytest.raises(ValueError, match="unsupported arguments"):
        llm.with_structured_output(Weather, temperature=0)
    with pytest.raises(ValueError, match="response_format must be"):
        llm.invoke(ASK, response_format={"type": "xml"})

    @tool
    def noop() -> str:
        """Nothing."""
        return ""

    with pytest.raises(ValueError, match="not both"):
        llm.bind_tools([noop]).invoke(ASK, response_format={"type": "json_object"})


def test_json_mode_without_a_schema_takes_any_object(tiny_model_dir):
    assert JsonReplyParser().parse('{"x": [1, {"y": null}]}') == {"x": [1, {"y": None}]}
    with pytest.raises(OutputParserException, match="not an object"):
        JsonReplyParser().parse("[1]")
    llm = ChatAgentMem(model=tiny_model_dir, max_tokens=8, session_id="any")
    out = llm.with_structured_output(None, method="json_mode", include_raw=True).invoke(ASK)
    assert out["raw"].content.startswith("{")
    (th,) = _engine._threads.values()
    assert th.session.messages()[-3].text == (
        "<|im_start|>system\nReply with one JSON object and nothing else.<|im_end|>\n"
    )  # no schema to show: the prompt says what it wants
