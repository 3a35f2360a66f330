"""What a reply in JSON is made to be (`response_format`, OpenAI's shapes): the format enforced,
the instruction that tells the model, the grammar that decodes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agentmem.chat.json_grammar import JsonGrammar

FORMATS = (
    '{"type": "text"}, {"type": "json_object"} or '
    '{"type": "json_schema", "json_schema": {"schema": {...}}}'
)


@dataclass(frozen=True)
class JsonFormat:
    """What the reply is made to be: one JSON object; with a `schema` (`json_schema`), one that
    follows it: the schema is given to the model and its keys (and listed values) decoded."""

    schema: dict | None = None


def json_format(response_format: Any) -> JsonFormat | None:
    """A call's `response_format` (OpenAI's shapes) as the `JsonFormat` enforced; raises for
    anything else."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":  # OpenAI's default: no constraint
        return None
    if kind == "json_object":
        return JsonFormat()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return JsonFormat(schema=schema)
    raise ValueError(f"response_format must be {FORMATS}, got {response_format!r}")


def instruction(fmt: JsonFormat) -> str:
    """The system instruction that tells the model what to write (rendered after the history,
    where the generation prompt follows it). JSON mode names no keys: the prompt says what it
    wants (LangChain's contract); shown a schema there, the 0.5B model wrote the schema back
    (measured), while with its keys decoded it fills them in."""
    if fmt.schema is None:
        return "Reply with one JSON object and nothing else."
    return (
        "Reply with one JSON object and nothing else: the values of the fields this JSON "
        f"schema describes.\n{json.dumps(fmt.schema, ensure_ascii=False)}"
    )


def grammar(tokenizer, eos, fmt: JsonFormat) -> JsonGrammar:
    """The grammar (`Sampling.allowed`, its `forbid`) of the reply."""
    return JsonGrammar(tokenizer, eos, schema=fmt.schema)
