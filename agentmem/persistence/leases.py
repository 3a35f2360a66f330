"""Session leases in the store's database: several `agentmem serve` processes share one store,
and a session is written by one of them at a time. A server takes a session's lease before a
reply on it, renews it while the reply runs, and lets it go after; a lease whose holder died
expires after its time to live."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from agentmem.persistence.schema import LeaseRow, now


@dataclass(frozen=True)
class Lease:
    """A lease taken: `previous` is who held it last ("" if nobody; the taker itself when it
    renews), so a server knows whether another wrote the session since."""

    holder: str
    previous: str


def acquire(write: sessionmaker, tenant: str, session_id: str, holder: str,
            ttl_s: float) -> Lease | None:  # fmt: skip
    """Take or renew the lease; None while another holder's has not expired."""
    when = now()
    try:
        with write.begin() as s:
            row = s.scalar(
                select(LeaseRow)
                .where(LeaseRow.tenant == tenant, LeaseRow.session_id == session_id)
                .with_for_update()
            )
            if row is None:
                s.add(LeaseRow(tenant=tenant, session_id=session_id, holder=holder,
                               expires=when + timedelta(seconds=ttl_s)))  # fmt: skip
                return Lease(holder, "")
            if row.holder != holder and row.expires > when:
                return None
            previous, row.holder = row.holder, holder
            row.expires = when + timedelta(seconds=ttl_s)
            return Lease(holder, previous)
    except IntegrityError:  # another server inserted it between our read and our insert
        return None


def release(write: sessionmaker, tenant: str, session_id: str, holder: str) -> None:
    """Let the lease go early (a no-op unless `holder` holds it). The row stays as a record of
    the last holder, expired now."""
    with write.begin() as s:
        row = s.scalar(
            select(LeaseRow)
            .where(LeaseRow.tenant == tenant, LeaseRow.session_id == session_id)
            .with_for_update()
        )
        if row is not None and row.holder == holder:
            row.expires = now()
