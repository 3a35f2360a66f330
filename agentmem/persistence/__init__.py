"""The session store (SQLAlchemy metadata + safetensors payloads): sessions, messages and
append-only tensor segments per tenant, on SQLite or PostgreSQL. Never imports models."""

from agentmem.persistence.errors import (
    CorruptBundle,
    CorruptPayload,
    InvalidId,
    SegmentNotFound,
    SessionExists,
    SessionNotFound,
    StoreError,
)
from agentmem.persistence.records import Message, Segment, SessionInfo
from agentmem.persistence.store import Store

__all__ = [
    "CorruptBundle",
    "CorruptPayload",
    "InvalidId",
    "Message",
    "Segment",
    "SegmentNotFound",
    "SessionExists",
    "SessionInfo",
    "SessionNotFound",
    "Store",
    "StoreError",
]
