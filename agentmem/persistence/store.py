"""The session store: sessions, their messages and their append-only tensor segments, per tenant.
Records live in SQL (SQLite by default, PostgreSQL by URL), tensors in safetensors payload files
under the store root. It knows nothing about models: payloads are opaque dicts of tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import delete as sql_delete
from sqlalchemy import func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as SqlSession
from sqlalchemy.orm import sessionmaker

from agentmem.paths import home
from agentmem.persistence import database, payloads
from agentmem.persistence.errors import (
    SegmentNotFound,
    SessionExists,
    SessionNotFound,
    StoreError,
)
from agentmem.persistence.ids import check_id
from agentmem.persistence.records import Message, Segment, SessionInfo
from agentmem.persistence.schema import (
    MessageRow,
    SegmentRow,
    SessionRow,
    SessionSegment,
    StoreInfo,
    Tenant,
    now,
)

MAX_ROLE = 64


def _json(value: Any, what: str) -> dict:
    """A JSON-safe copy of `value` (what the database will give back), or a clear error."""
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable (finite numbers, str keys): {e}") from e


def _check(tenant: str, session_id: str) -> None:
    check_id(tenant, "tenant")
    check_id(session_id, "session id")


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return value


def _message(role: Any, text: Any, start: Any, end: Any, when) -> Message:
    """A message checked where it enters."""
    if not isinstance(role, str) or not 1 <= len(role) <= MAX_ROLE or "\0" in role:
        raise ValueError(f"role must be a str of 1-{MAX_ROLE} characters without NUL")
    if not isinstance(text, str) or "\0" in text:
        raise ValueError("text must be a str without NUL characters (PostgreSQL stores none)")
    start, end = _count(start, "start"), _count(end, "end")
    if end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")
    return Message(role=role, text=text, start=start, end=end, created=when)


def _not_found(tenant: str, session_id: str) -> SessionNotFound:
    return SessionNotFound(f"no session {session_id!r} for tenant {tenant!r}")


def _info(row: SessionRow) -> SessionInfo:
    return SessionInfo(
        id=row.session_id,
        tenant=row.tenant,
        tokens=row.tokens,
        created=row.created,
        updated=row.updated,
        parent=row.parent,
        fingerprint=row.fingerprint,
        memory=row.memory,
    )


def _ensure_tenant(s: SqlSession, tenant: str) -> None:
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        if s.get(Tenant, tenant) is None:
            s.add(Tenant(id=tenant, created=now()))
            s.flush()
        return
    s.execute(upsert(Tenant).values(id=tenant, created=now()).on_conflict_do_nothing())


class Store:
    """Sessions of many tenants in one database and one payload root.

    `url`: an SQLAlchemy URL (default `sqlite:///<root>/store.db`; PostgreSQL:
    `postgresql+psycopg://...`, the `postgres` extra). `root`: where payload files live (default
    `agentmem.paths.home() / "store"`); one root per database. Opening migrates the schema to the
    newest revision and removes payload files left by a crash.
    """

    def __init__(self, url: str | None = None, root: str | os.PathLike | None = None):
        self.root = (Path(root) if root is not None else home() / "store").absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = url if url is not None else f"sqlite:///{self.root / 'store.db'}"
        self._engine, self._write_engine = database.make_engines(self.url)
        self._read = sessionmaker(self._engine, expire_on_commit=False)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        try:
            database.upgrade(self._write_engine)
            with self._read() as s:
                store_id = s.scalar(select(StoreInfo.id))
            payloads.claim(self.root, store_id)
            self.collect_orphans()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the database connections (the store can't be used afterwards)."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        url = self._engine.url.render_as_string(hide_password=True)
        return f"Store(url={url!r}, root={str(self.root)!r})"

    # -- sessions ---------------------------------------------------------------------------------

    def create_session(
        self, tenant: str, session_id: str, *, fingerprint: dict, memory: dict
    ) -> SessionInfo:
        _check(tenant, session_id)
        fingerprint, memory = _json(fingerprint, "fingerprint"), _json(memory, "memory")
        when = now()
        try:
            with self._write.begin() as s:
                _ensure_tenant(s, tenant)
                if self._find(s, tenant, session_id) is not None:
                    raise self._exists(tenant, session_id)
                row = SessionRow(
                    tenant=tenant, session_id=session_id, fingerprint=fingerprint,
                    memory=memory, tokens=0, parent=None, created=when, updated=when,
                )  # fmt: skip
                s.add(row)
                s.flush()
                return _info(row)
        except IntegrityError as e:  # another writer created it between our check and insert
            raise self._exists(tenant, session_id) from e

    def session_info(self, tenant: str, session_id: str) -> SessionInfo | None:
        _check(tenant, session_id)
        with self._read() as s:
            row = self._find(s, tenant, session_id)
            return None if row is None else _info(row)

    def sessions(self, tenant: str) -> list[SessionInfo]:
        """This tenant's sessions, oldest first."""
        check_id(tenant, "tenant")
        with self._read() as s:
            rows = s.scalars(
                select(SessionRow)
                .where(SessionRow.tenant == tenant)
                .order_by(SessionRow.created, SessionRow.pk)
            )
            return [_info(row) for row in rows]

    def fork(self, tenant: str, session_id: str, new_id: str) -> SessionInfo:
        """A new session `new_id` with the messages and segments of `session_id` (the segments'
        files are shared, not copied); later writes to either don't reach the other."""
        _check(tenant, session_id)
        check_id(new_id, "new session id")
        when = now()
        try:
            with self._write.begin() as s:
                parent = self._find(s, tenant, session_id, lock=True)
                if parent is None:
                    raise _not_found(tenant, session_id)
                if self._find(s, tenant, new_id) is not None:
                    raise self._exists(tenant, new_id)
                row = SessionRow(
                    tenant=tenant, session_id=new_id, fingerprint=parent.fingerprint,
                    memory=parent.memory, tokens=parent.tokens, parent=session_id,
                    created=when, updated=when,
                )  # fmt: skip
                s.add(row)
                s.flush()
                m = MessageRow
                s.execute(
                    insert(m).from_select(
                        ["session_pk", "seq", "role", "text", "start", "end", "created"],
                        select(literal(row.pk), m.seq, m.role, m.text, m.start, m.end, m.created)
                        .where(m.session_pk == parent.pk),
                    )
                )  # fmt: skip
                ss = SessionSegment
                s.execute(
                    insert(ss).from_select(
                        ["session_pk", "seq", "segment_id"],
                        select(literal(row.pk), ss.seq, ss.segment_id)
                        .where(ss.session_pk == parent.pk),
                    )
                )  # fmt: skip
                return _info(row)
        except IntegrityError as e:
            raise self._exists(tenant, new_id) from e

    def delete(self, tenant: str, session_id: str) -> None:
        """Remove the session, its messages and its segment links; payload files that no other
        session references are deleted once the removal has committed."""
        _check(tenant, session_id)
        with self._write.begin() as s:
            row = self._find(s, tenant, session_id, lock=True)
            if row is None:
                raise _not_found(tenant, session_id)
            ss = SessionSegment
            ids = list(s.scalars(select(ss.segment_id).where(ss.session_pk == row.pk)))
            s.execute(sql_delete(ss).where(ss.session_pk == row.pk))
            s.execute(sql_delete(MessageRow).where(MessageRow.session_pk == row.pk))
            s.execute(sql_delete(SessionRow).where(SessionRow.pk == row.pk))
            freed = []
            if ids:
                still = select(ss.segment_id).where(ss.segment_id == SegmentRow.id).exists()
                freed = list(
                    s.scalars(
                        sql_delete(SegmentRow)
                        .where(SegmentRow.id.in_(ids), ~still)
                        .returning(SegmentRow.file)
                    )
                )
        for name in freed:
            # A file that can't be removed now is an orphan: the next open collects it.
            try:
                payloads.resolve(self.root, name).unlink(missing_ok=True)
            except OSError:
                pass
        if freed:
            payloads.fsync_dir(self.root / payloads.DIR)

    # -- messages ---------------------------------------------------------------------------------

    def add_message(
        self, tenant: str, session_id: str, role: str, text: str, start: int, end: int
    ) -> Message:
        """Append a message (stored literally) covering tokens [start, end) of the memory."""
        _check(tenant, session_id)
        message = _message(role, text, start, end, now())
        with self._write.begin() as s:
            pk = self._touch(s, tenant, session_id, message.created)
            self._add_messages(s, pk, [message])
        return message

    def _add_messages(self, s: SqlSession, pk: int, messages: list[Message]) -> None:
        seq = self._next_seq(s, MessageRow, pk)
        for offset, m in enumerate(messages):
            s.add(
                MessageRow(
                    session_pk=pk, seq=seq + offset, role=m.role, text=m.text, start=m.start,
                    end=m.end, created=m.created,
                )
            )  # fmt: skip

    def messages(self, tenant: str, session_id: str) -> list[Message]:
        """The session's messages in the order they were added."""
        _check(tenant, session_id)
        with self._read() as s:
            pk = self._pk(s, tenant, session_id)
            rows = s.scalars(
                select(MessageRow).where(MessageRow.session_pk == pk).order_by(MessageRow.seq)
            )
            return [Message(r.role, r.text, r.start, r.end, r.created) for r in rows]

    # -- segments ---------------------------------------------------------------------------------

    def write_segment(
        self,
        tenant: str,
        session_id: str,
        tensors: dict[str, torch.Tensor],
        meta: dict,
        tokens: int,
        messages: list[tuple[str, str, int, int]] = (),
    ) -> Segment:
        """Append one segment: the payload file is made durable first, then its row, the
        session's link to it, the session's token count and `messages` (role, text, start, end:
        those the segment's tokens belong to) commit in one transaction, so a crash leaves a
        save whole or absent, its messages with it."""
        _check(tenant, session_id)
        meta, tokens = _json(meta, "meta"), _count(tokens, "tokens")
        when = now()
        messages = [_message(*m, when) for m in messages]
        with self._read() as s:
            self._pk(s, tenant, session_id)  # fail before writing a file
        name, size, digest = payloads.write(self.root, tensors)
        try:
            with self._write.begin() as s:
                pk = self._touch(s, tenant, session_id, now(), tokens=tokens)
                seq = self._next_seq(s, SessionSegment, pk)
                row = SegmentRow(file=name, bytes=size, sha256=digest, meta=meta, created=now())
                s.add(row)
                s.flush()
                s.add(SessionSegment(session_pk=pk, seq=seq, segment_id=row.id))
                self._add_messages(s, pk, messages)
                segment = Segment(row.id, seq, name, size, digest, meta)
        except BaseException:
            payloads.resolve(self.root, name).unlink(missing_ok=True)
            raise
        return segment

    def segments(self, tenant: str, session_id: str) -> list[Segment]:
        """The session's segments in order, those inherited through a fork included."""
        _check(tenant, session_id)
        with self._read() as s:
            pk = self._pk(s, tenant, session_id)
            rows = s.execute(
                select(SessionSegment.seq, SegmentRow)
                .join(SegmentRow, SegmentRow.id == SessionSegment.segment_id)
                .where(SessionSegment.session_pk == pk)
                .order_by(SessionSegment.seq)
            )
            return [Segment(r.id, seq, r.file, r.bytes, r.sha256, r.meta) for seq, r in rows]

    def read_segment(self, segment: Segment) -> dict[str, torch.Tensor]:
        """The segment's tensors, after checking the file against its recorded size and sha256
        (CorruptPayload naming the file if it doesn't match or can't be read)."""
        if not isinstance(segment, Segment):
            raise TypeError(f"read_segment takes a Segment, got {type(segment).__name__}")
        with self._read() as s:
            row = s.get(SegmentRow, segment.id)
        if row is None or row.file != segment.file:
            raise SegmentNotFound(
                f"segment {segment.id} ({segment.file!r}) is not in this store; "
                "read the segments Store.segments returns"
            )
        return payloads.read(payloads.resolve(self.root, row.file), row.bytes, row.sha256)

    def segment_path(self, segment: Segment) -> Path:
        """Where the segment's payload file lives."""
        return payloads.resolve(self.root, segment.file)

    # -- maintenance ------------------------------------------------------------------------------

    def collect_orphans(self, grace_s: float = payloads.ORPHAN_GRACE_S) -> list[Path]:
        """Remove payload and temp files no segment row names (a crash between writing a file
        and committing its row, or between deleting a row and its file), once older than
        `grace_s` (younger ones may be another process's write in flight). Returns them."""
        with self._read() as s:
            known = set(s.scalars(select(SegmentRow.file)))
        removed = []
        for path in payloads.orphans(self.root, known, grace_s):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _find(s: SqlSession, tenant: str, session_id: str, lock: bool = False) -> SessionRow | None:
        query = select(SessionRow).where(
            SessionRow.tenant == tenant, SessionRow.session_id == session_id
        )
        return s.scalar(query.with_for_update() if lock else query)

    @staticmethod
    def _pk(s: SqlSession, tenant: str, session_id: str) -> int:
        pk = s.scalar(
            select(SessionRow.pk).where(
                SessionRow.tenant == tenant, SessionRow.session_id == session_id
            )
        )
        if pk is None:
            raise _not_found(tenant, session_id)
        return pk

    @staticmethod
    def _touch(s: SqlSession, tenant: str, session_id: str, when, **values: Any) -> int:
        """Update the session row first: on PostgreSQL this locks it, so concurrent appends to
        one session take their sequence numbers one after the other."""
        pk = s.execute(
            update(SessionRow)
            .where(SessionRow.tenant == tenant, SessionRow.session_id == session_id)
            .values(updated=when, **values)
            .returning(SessionRow.pk)
        ).scalar_one_or_none()
        if pk is None:
            raise _not_found(tenant, session_id)
        return pk

    @staticmethod
    def _next_seq(s: SqlSession, table: type, pk: int) -> int:
        last = s.scalar(select(func.max(table.seq)).where(table.session_pk == pk))
        return 0 if last is None else last + 1

    @staticmethod
    def _exists(tenant: str, session_id: str) -> StoreError:
        return SessionExists(
            f"session {session_id!r} already exists for tenant {tenant!r}; pick another id "
            "or delete it first"
        )
