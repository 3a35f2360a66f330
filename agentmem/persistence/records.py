"""The records the session store hands out: frozen snapshots, detached from the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class SessionInfo:
    id: str
    tenant: str
    tokens: int
    created: datetime
    updated: datetime
    parent: str | None  # the session it was forked from (which may since have been deleted)
    fingerprint: dict[str, Any] = field(compare=True)
    memory: dict[str, Any] = field(compare=True)


@dataclass(frozen=True)
class Message:
    role: str
    text: str
    start: int  # token span [start, end) in the session's memory
    end: int
    created: datetime


@dataclass(frozen=True)
class Segment:
    id: int
    seq: int  # its place in the session's append-only list of saves
    file: str  # relative to the store root
    bytes: int
    sha256: str
    meta: dict[str, Any]
