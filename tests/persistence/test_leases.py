"""Session leases (SQLite and PostgreSQL): one holder at a time; renewed by its holder; taken
over once expired or released; named per tenant; gone with the session."""

from __future__ import annotations

import time

from tests.persistence.test_sessions import FP, MEM


def test_one_holder_at_a_time(store):
    first = store.acquire_lease("s", "server-a", tenant="acme")
    assert first is not None and first.previous == ""
    assert store.acquire_lease("s", "server-b", tenant="acme") is None  # a's runs
    again = store.acquire_lease("s", "server-a", tenant="acme")  # renewed by its holder
    assert again is not None and again.previous == "server-a"
    assert store.acquire_lease("s", "server-b", tenant="globex") is not None  # another tenant's


def test_a_released_or_expired_lease_is_taken_over(store):
    assert store.acquire_lease("s", "server-a", tenant="acme") is not None
    store.release_lease("s", "server-b", tenant="acme")  # not b's to release: a no-op
    assert store.acquire_lease("s", "server-b", tenant="acme") is None
    store.release_lease("s", "server-a", tenant="acme")
    taken = store.acquire_lease("s", "server-b", ttl_s=0.2, tenant="acme")
    assert taken is not None and taken.previous == "server-a"  # b knows a wrote it last
    assert store.acquire_lease("s", "server-a", tenant="acme") is None
    time.sleep(0.3)  # b died without releasing: its lease expires
    assert store.acquire_lease("s", "server-a", tenant="acme").previous == "server-b"


def test_a_deleted_session_takes_its_lease_along(store):

    store.create_session("s", fingerprint=FP, memory=MEM, tenant="acme")
    assert store.acquire_lease("s", "server-a", tenant="acme") is not None
    store.delete("s", tenant="acme")
    assert store.acquire_lease("s", "server-b", tenant="acme").previous == ""
