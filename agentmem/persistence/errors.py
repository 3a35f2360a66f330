"""What the session store raises: every error is a `StoreError`, each says what to do about it."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the session store's errors."""


class SessionExists(StoreError):
    """A session with this id already exists for this tenant."""


class SessionNotFound(StoreError):
    """No session with this id for this tenant (whether another tenant has one is never said)."""


class SegmentNotFound(StoreError):
    """A segment the store has no record of (not one returned by `Store.segments`)."""


class InvalidId(StoreError, ValueError):
    """A tenant or session id outside the allowed alphabet or length."""


class CorruptPayload(StoreError):
    """A payload file is missing, truncated, altered or unreadable; the message names the file."""


class CorruptBundle(StoreError):
    """A session bundle that can't be imported: not a tar file, a member that isn't a plain file
    of the bundle, or a manifest of another format version or that fails validation; the message
    names the bundle and the member."""
