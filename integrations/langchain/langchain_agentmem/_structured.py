"""Structured output for ChatAgentMem: the runnable `with_structured_output` returns for the JSON
methods (the reply made one JSON object by `agentmem.chat.formats`), the reply parsed and
checked against the schema (pydantic validates its own classes)."""

from __future__ import annotations

import json
from operator import itemgetter
from typing import Any

import pydantic
from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers.transform import BaseCumulativeTransformOutputParser
from langchain_core.outputs import Generation
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.json import parse_partial_json
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic.v1 import ValidationError as ValidationErrorV1

METHODS = ("function_calling", "json_schema", "json_mode")
# JSON-schema types as Python ones (a bool is no number in JSON).
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
         "object": dict, "null": type(None)}  # fmt: skip


def json_output(llm, schema: Any, *, method: str, include_raw: bool) -> Runnable:
    """`llm` bound to reply in JSON (`method` "json_schema" or "json_mode"), piped into the
    parser of `schema` (LangChain's contract: a pydantic class gives its instances, any other
    schema dicts; `include_raw` gives {raw, parsed, parsing_error})."""
    if schema is None and method == "json_schema":
        raise ValueError(
            'method="json_schema" needs a schema (a pydantic class, a TypedDict or a JSON '
            'schema); for any JSON object use method="json_mode"'
        )
    described = None if schema is None else convert_to_json_schema(schema)
    if method == "json_schema":
        spec = {"name": described.get("title") or "output", "schema": described}
        response_format = {"type": "json_schema", "json_schema": spec}
    else:
        response_format = {"type": "json_object"}
    bind: dict[str, Any] = {"response_format": response_format}
    if schema is not None:
        bind["ls_structured_output_format"] = {"kwargs": {"method": method}, "schema": schema}
    model = schema if isinstance(schema, type) and is_basemodel_subclass(schema) else None
    parser = JsonReplyParser(json_schema=described, pydantic_object=model)
    bound = llm.bind(**bind)
    if not include_raw:
        return bound | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parsed.with_fallbacks([failed], exception_key="parsing_error")


class JsonReplyParser(BaseCumulativeTransformOutputParser[Any]):
    """A reply that is one JSON object, as an instance of `pydantic_object` (validated by it)
    or as a dict checked against `json_schema` (an object; its required keys; the JSON types
    of its top-level properties, null passing for a key not required). Streamed, it yields
    the object as far as written (a pydantic one once it validates). Failures raise
    `OutputParserException`."""

    json_schema: dict | None = None
    pydantic_object: Any = None

    @property
    def _type(self) -> str:
        return "agentmem_json_reply"

    def parse(self, text: str) -> Any:
        return self.parse_result([Generation(text=text)])

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        text = result[0].text.strip()
        if partial:
            try:
                value = parse_partial_json(text)
            except json.JSONDecodeError:
                return None
            if not isinstance(value, dict):
                return None
            try:
                return self._checked(value, text)
            except OutputParserException:
                return None if self.pydantic_object is not None else value
        try:  # what follows the object (the rest of its last token) is not read
            value, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as e:
            raise OutputParserException(
                f"the reply is no JSON object ({e}): {text!r}", llm_output=text
            ) from e
        return self._checked(value, text)

    def _checked(self, value: Any, text: str) -> Any:
        model = self.pydantic_object
        if model is not None:
            try:
                if hasattr(model, "model_validate"):
                    return model.model_validate(value)
                return model.parse_obj(value)  # a pydantic.v1 model
            except (pydantic.ValidationError, ValidationErrorV1) as e:
                raise OutputParserException(
                    f"the reply does not fit {model.__name__}: {e}", llm_output=text
                ) from e
        problem = _misfit(value, self.json_schema)
        if problem:
            raise OutputParserException(f"the reply {problem}: {text!r}", llm_output=text)
        return value


def _misfit(value: Any, schema: dict | None) -> str | None:
    """What keeps `value` from fitting the top level of `schema`, or None."""
    if not isinstance(value, dict):
        return f"is a JSON {type(value).__name__}, not an object"
    if schema is None:
        return None
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        return f"lacks the required key(s) {', '.join(map(repr, missing))}"
    properties = schema.get("properties") or {}
    required = set(schema.get("required", []))
    for key, item in value.items():
        if item is None and key not in required:  # as absent (LangChain's schema of a
            continue  # TypedDict drops the `| None` of its optional keys)
        types = _types(properties.get(key))
        if types and not any(_is(item, t) for t in types):
            return f"has {key!r} of type {type(item).__name__}, not {' or '.join(types)}"
    return None


def _types(spec: Any) -> list[str]:
    """The JSON types a property's schema names (`type`, or `anyOf` of typed ones); [] where
    it says none plainly (then nothing is checked)."""
    if not isinstance(spec, dict):
        return []
    kind = spec.get("type")
    if isinstance(kind, str):
        return [kind] if kind in TYPES else []
    if isinstance(kind, list):
        return kind if all(k in TYPES for k in kind) else []
    options = spec.get("anyOf")
    if isinstance(options, list) and options:
        found = [_types(option) for option in options]
        return [t for ts in found for t in ts] if all(found) else []
    return []


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, TYPES[kind])
