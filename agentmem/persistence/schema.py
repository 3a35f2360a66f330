"""The session store's tables as SQLAlchemy 2 ORM classes (portable: SQLite and PostgreSQL).
The database itself is made by the Alembic migrations in `migrations/`; a test checks that the
two agree."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out on every backend (SQLite keeps no zone; PostgreSQL
    returns the server's zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware (UTC) one")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StoreInfo(Base):
    """One row: this database's id, written beside the payloads so two databases never share
    (and garbage-collect) one root."""

    __tablename__ = "store_info"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (UniqueConstraint("tenant", "session_id"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), ForeignKey("tenants.id", ondelete="RESTRICT"))
    session_id: Mapped[str] = mapped_column(String(128))
    fingerprint: Mapped[dict] = mapped_column(JSON)
    memory: Mapped[dict] = mapped_column(JSON)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    parent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)


class MessageRow(Base):
    __tablename__ = "messages"
    session_pk: Mapped[int] = mapped_column(
        Integer, ForeignKey("sessions.pk", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    start: Mapped[int] = mapped_column(BigInteger)
    end: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(UTCDateTime)


class SegmentRow(Base):
    __tablename__ = "segments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    file: Mapped[str] = mapped_column(String(255), unique=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(UTCDateTime)


class SessionSegment(Base):
    """A session's list of segments; a fork links its parent's segments (no file is copied)."""

    __tablename__ = "session_segments"
    __table_args__ = (Index("ix_session_segments_segment_id", "segment_id"),)
    session_pk: Mapped[int] = mapped_column(
        Integer, ForeignKey("sessions.pk", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    segment_id: Mapped[int] = mapped_column(Integer, ForeignKey("segments.id", ondelete="RESTRICT"))


class LeaseRow(Base):
    """Which server writes a session now (`agentmem serve` processes sharing one store): a
    holder's lease lasts until `expires` unless renewed. Named by tenant and session id, not by
    the session's row, which the lease's first reply may not have made yet."""

    __tablename__ = "session_leases"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires: Mapped[datetime] = mapped_column(UTCDateTime)
