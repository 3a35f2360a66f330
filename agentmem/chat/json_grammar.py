"""A reply that is one JSON object, enforced while it decodes: a scan of the text written so far
(where the top-level object ends, its keys, the key or value being written) and the `Sampling`
constraints built on it (no end before the object closes, nothing after; with a schema, its
properties as the keys and the choices of its enum, const and boolean properties as values)."""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

# Tokens that open an object as a model writes it: `{`, `{"`, `{\n`...
OPENING = re.compile(r'\{\s*"?')
_openings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Scan:
    """What a text that starts a JSON object holds so far."""

    ok: bool = True  # False: it starts with something else than an object
    end: int | None = None  # where the top-level object ends (None: still open)
    keys: list[str] = field(default_factory=list)  # its keys written so far (with their colon)
    slot: str | None = None  # a top-level key being written: the text since the `{` or `,`
    before: str = ""  # the `{` or `,` the slot follows
    value: str | None = None  # the value of the last key being written: the text since `:`


def scan(text: str) -> Scan:
    """The top-level JSON object `text` starts with (after whitespace), read as far as written.
    Strings are skipped with their escapes, so a brace or comma inside one is no structure."""
    i = len(text) - len(text.lstrip())
    if i == len(text):
        return Scan()
    if text[i] != "{":
        return Scan(ok=False)
    out = Scan()
    depth, in_string, escaped = 0, False, False
    slot_at: int | None = None  # where the current key slot starts (None: in a value)
    value_at: int | None = None  # where the current value starts
    key_at: int | None = None  # where the current key's string starts
    pending: str | None = None  # a key written, its colon not yet
    for j in range(i, len(text)):
        ch = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if key_at is not None:
                    pending, key_at = _string(text[key_at : j + 1]), None
        elif ch == '"':
            in_string = True
            if depth == 1 and slot_at is not None:
                key_at = j
        elif ch in "{[":
            depth += 1
            if depth == 1:
                slot_at = j + 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                out.end = j + 1
                return out
        elif depth == 1 and ch == ",":
            slot_at, value_at = j + 1, None
        elif depth == 1 and ch == ":" and slot_at is not None:
            if pending is not None:
                out.keys.append(pending)
            slot_at, value_at, pending = None, j + 1, None
    if slot_at is not None:
        out.slot, out.before = text[slot_at:], text[slot_at - 1]
    elif value_at is not None:
        out.value = text[value_at:]
    return out


def _string(literal: str) -> str:
    try:
        return json.loads(literal)
    except json.JSONDecodeError:  # an invalid escape: the raw text is as good a name
        return literal[1:-1]


def choices(schema: dict, spec: object) -> list[str] | None:
    """The JSON texts a property's value may be when its schema lists them (`enum`, `const`,
    type boolean or null, `anyOf` of such; local `$ref`s followed); None when it does not."""
    if not isinstance(spec, dict):
        return None
    ref = spec.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: object = schema
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return choices(schema, target)
    if "const" in spec:
        values = [spec["const"]]
    elif isinstance(spec.get("enum"), list) and spec["enum"]:
        values = spec["enum"]
    elif spec.get("type") == "boolean":
        values = [True, False]
    elif spec.get("type") == "null":
        values = [None]
    elif isinstance(spec.get("anyOf"), list) and spec["anyOf"]:
        found = [choices(schema, option) for option in spec["anyOf"]]
        return [c for cs in found for c in cs] if all(found) else None
    else:
        return None
    if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
        return None
    return [json.dumps(v, ensure_ascii=False) for v in values]


def tokens_holding(tokenizer, chars: str) -> tuple[list[int], list[str]]:
    """The ids of the tokens whose vocabulary piece holds one of `chars`, and their decoded
    texts: a vocabulary scan that decodes only the few candidates, not every token."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    near = [i for i, piece in enumerate(pieces) if piece and any(c in piece for c in chars)]
    return near, tokenizer.batch_decode([[i] for i in near])


def opening_ids(tokenizer) -> list[int]:
    """The ids of the tokens that open an object (`OPENING`), once per tokenizer. The model
    picks its own: forced to a bare `{`, the 0.5B model, which writes `{\n  "a": ...`, wrote
    `{ "a": "...` and repeated itself inside the string to the end of its tokens (measured)."""
    found = _openings.get(tokenizer)
    if found is None:
        near, texts = tokens_holding(tokenizer, "{")
        found = [i for i, t in zip(near, texts, strict=True) if OPENING.fullmatch(t)]
        _openings[tokenizer] = found
    return found


class JsonGrammar:
    """`Sampling.allowed` (the grammar itself) and `Sampling.forbid` (its `forbid`) for a reply
    that is one JSON object: it opens with a token of `opening_ids` (or the first of the first
    key, with a schema); no end of sequence while the object is open; once it closed, nothing
    but the end.

    With a `schema` (an object's, with `properties`), its top-level keys are the properties,
    each once, spelled `"key":` token by token (`{"a":`, `{\n"a":`, `, "b":`); a property whose
    values the schema lists (enum, const, boolean) gets one of them, and after it a `,` (if
    keys are left) or the `}` (once the required keys are written). Other values are free.
    Where the reply already left this grammar (a token that ran into a key, a character split
    across tokens) nothing is constrained but the end: never a dead end."""

    def __init__(self, tokenizer, eos: Iterable[int] = (), *,
                 schema: dict | None = None) -> None:  # fmt: skip
        self.tokenizer, self.eos = tokenizer, sorted(eos)
        schema = schema or {}
        properties = schema.get("properties")
        closed = schema.get("type", "object") == "object" and not schema.get("additionalProperties")
        self.keys = list(properties) if isinstance(properties, dict) and properties else None
        self.keys = self.keys if closed else None  # other keys may be written too: all free
        self.choices = {k: choices(schema, properties[k]) for k in self.keys or ()}
        self.required = set(schema.get("required") or ())
        self._last: tuple[list[int], Scan] | None = None

    def _scan(self, generated: list[int]) -> Scan:
        if self._last is None or self._last[0] != generated:  # allowed and forbid ask in turn
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            self._last = (list(generated), scan(text))
        return self._last[1]

    def __call__(self, generated: list[int]) -> list[int] | None:
        if not generated:
            ids = set(opening_ids(self.tokenizer)) | set(self.first_ids(self.opening()) or ())
            return sorted(ids) or self.first_ids(["{"])
        found = self._scan(generated)
        return self.eos if found.end is not None else self.inside(found)

    def inside(self, found: Scan) -> list[int] | None:
        """The ids the next token may be while the object is open (None: any): what the schema
        constrains of its keys and values."""
        if self.keys is None or not found.ok or found.end is not None:
            return None
        if found.slot is not None:
            return self.first_ids(self._key_rests(found))
        if found.value is not None and found.keys and self.choices.get(found.keys[-1]):
            return self.first_ids(self._value_rests(found))
        return None

    def opening(self, lead: str = "") -> list[str]:
        """How the object may begin (after `lead`): its `{` with the first key. Spelled whole,
        the first token is the one the tokenizer gives the text (` {"` rather than ` `)."""
        if self.keys is None:
            return [lead + "{"]
        return [lead + "{" + rest for rest in self._key_rests(Scan(slot="", before="{"))]

    def forbid(self, generated: list[int]) -> list[int]:
        found = self._scan(generated)
        return [] if found.end is not None or not found.ok else self.eos

    def _left(self, found: Scan) -> list[str]:
        return [k for k in self.keys if k not in found.keys]

    def _key_rests(self, found: Scan) -> list[str]:
        """What is left to write of each key the slot can still become."""
        written = found.slot.lstrip()
        left = self._left(found)
        rests = []
        if not written and found.before == "{" and not self.required.intersection(left):
            rests.append("}")  # an empty object is one too
        for key in left:
            spelled = json.dumps(key, ensure_ascii=False) + ":"
            if not written:  # the key not begun: `{"a":` / `, "b":`
                spaced = found.before == "," and found.slot == ""
                rests.append((" " if spaced else "") + spelled)
            elif spelled.startswith(written):
                rests.append(spelled[len(written) :])
        return rests

    def _value_rests(self, found: Scan) -> list[str]:
        """What is left to write of each value the key's may still become, and once one is
        complete, what may follow it: a `,` while keys are left, the `}` once none required
        is."""
        written = found.value.lstrip()
        options = self.choices[found.keys[-1]]
        lead = "" if found.value else " "
        rests = [
            lead + o[len(written) :] for o in options if o.startswith(written) and o != written
        ]
        if written in options:
            left = self._left(found)
            after = Scan(keys=found.keys, slot="", before=",")
            rests += ["," + rest for rest in self._key_rests(after)]  # `, "b":`
            if not self.required.intersection(left):
                rests.append("}")
        return rests

    def first_ids(self, rests: list[str]) -> list[int] | None:
        """The first token of each text (as the tokenizer spells it alone); None for none."""
        ids = set()
        for rest in rests:
            tokens = self.tokenizer(rest, add_special_tokens=False).input_ids
            if tokens:
                ids.add(tokens[0])
        return sorted(ids) or None
