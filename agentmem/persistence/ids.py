"""Validation of tenant and session ids, where they enter the store: ids reach SQL only as bound
parameters and never reach a file name, but a strict alphabet keeps logs, URLs and exports safe."""

from __future__ import annotations

import re

from agentmem.persistence.errors import InvalidId

MAX_ID = 128
_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
ALLOWED = f"1-{MAX_ID} ASCII letters, digits and '._:@-', not starting with '.'"


def check_id(value: object, what: str) -> str:
    """`value` if it is a valid id, else InvalidId saying what is allowed."""
    if not isinstance(value, str):
        raise InvalidId(f"{what} must be a str of {ALLOWED}; got {type(value).__name__}")
    if _ID.fullmatch(value) is None or value.startswith("."):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidId(f"invalid {what} {shown!r}: use {ALLOWED}")
    return value
