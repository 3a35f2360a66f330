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
from agentmem.persistence import bundle, database, leases, payloads
from agentmem.persistence import search as search_
from agentmem.persistence.errors import (
    SegmentNotFound,
    SessionExists,
    SessionNotFound,
    StoreError,
)
from agentmem.persistence.ids import check_id
from agentmem.persistence.mapped import MappedPayload
from agentmem.persistence.records import Message, Segment, SessionInfo
from agentmem.persistence.schema import (
    LeaseRow,
    MessageRow,
    SegmentRow,
    SessionRow,
    SessionSegment,
    StoreInfo,
    Tenant,
    now,
)

MAX_ROLE = 64
DEFAULT_TENANT = "default"  # for one-tenant use; every call names a session by id and tenant


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

    A session is named by its id and its tenant (`tenant=`, keyword only; "default" if left
    out): no call reaches another tenant's sessions.
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
        self, session_id: str, *, fingerprint: dict, memory: dict, tenant: str = DEFAULT_TENANT
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

    def session_info(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> SessionInfo | None:
        _check(tenant, session_id)
        with self._read() as s:
            row = self._find(s, tenant, session_id)
            return None if row is None else _info(row)

    def sessions(self, *, tenant: str = DEFAULT_TENANT) -> list[SessionInfo]:
        """This tenant's sessions, oldest first."""
        check_id(tenant, "tenant")
        with self._read() as s:
            rows = s.scalars(
                select(SessionRow)
                .where(SessionRow.tenant == tenant)
                .order_by(SessionRow.created, SessionRow.pk)
            )
            return [_info(row) for row in rows]

    def fork(
        self, session_id: str, new_id: str, *, tenant: str = DEFAULT_TENANT,
        segments: int | None = None, tokens: int | None = None,
    ) -> SessionInfo:  # fmt: skip
        """A new session `new_id` with the messages and segments of `session_id` (the segments'
        files are shared, not copied); later writes to either don't reach the other.

        With `segments=k` and `tokens=t` (given together) it gets only the first k segments and
        the messages that end at or before token t, and counts t tokens: the caller says how
        many tokens those segments hold (the store doesn't read payloads)."""
        _check(tenant, session_id)
        check_id(new_id, "new session id")
        if (segments is None) != (tokens is None):
            raise ValueError("fork takes segments= and tokens= together (or neither)")
        if segments is not None:
            segments, tokens = _count(segments, "segments"), _count(tokens, "tokens")
        when = now()
        try:
            with self._write.begin() as s:
                parent = self._find(s, tenant, session_id, lock=True)
                if parent is None:
                    raise _not_found(tenant, session_id)
                if self._find(s, tenant, new_id) is not None:
                    raise self._exists(tenant, new_id)
                m, ss = MessageRow, SessionSegment
                saved = self._next_seq(s, ss, parent.pk)  # its segments' count (seq 0, 1, ...)
                keep = [m.session_pk == parent.pk]  # a whole fork: every message, wherever it ends
                if segments is None:
                    segments, tokens = saved, parent.tokens
                elif segments > saved or tokens > parent.tokens:
                    raise ValueError(
                        f"session {session_id!r} has {saved} segments and {parent.tokens} tokens; "
                        f"a fork can't take {segments} and {tokens}"
                    )
                else:
                    keep.append(m.end <= tokens)
                row = SessionRow(
                    tenant=tenant, session_id=new_id, fingerprint=parent.fingerprint,
                    memory=parent.memory, tokens=tokens, parent=session_id,
                    created=when, updated=when,
                )  # fmt: skip
                s.add(row)
                s.flush()
                s.execute(
                    insert(m).from_select(
                        ["session_pk", "seq", "role", "text", "start", "end", "created"],
                        select(literal(row.pk), m.seq, m.role, m.text, m.start, m.end, m.created)
                        .where(*keep),
                    )
                )  # fmt: skip
                s.execute(
                    insert(ss).from_select(
                        ["session_pk", "seq", "segment_id"],
                        select(literal(row.pk), ss.seq, ss.segment_id)
                        .where(ss.session_pk == parent.pk, ss.seq < segments),
                    )
                )  # fmt: skip
                return _info(row)
        except IntegrityError as e:
            raise self._exists(tenant, new_id) from e

    def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
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
            s.execute(
                sql_delete(LeaseRow).where(
                    LeaseRow.tenant == tenant, LeaseRow.session_id == session_id
                )
            )
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

    # -- bundles ----------------------------------------------------------------------------------

    def export_session(
        self, session_id: str, path: str | os.PathLike, *, tenant: str = DEFAULT_TENANT
    ) -> Path:
        """Write the session (record, messages, segments and their payloads) to one tar file at
        `path` that `import_` reads into any store; returns its absolute path. The rows are read
        under the session's write lock: a save in flight is in the bundle whole or not at all."""
        _check(tenant, session_id)
        with self._write.begin() as s:
            row = self._find(s, tenant, session_id, lock=True)
            if row is None:
                raise _not_found(tenant, session_id)
            m, ss = MessageRow, SessionSegment
            rows = s.scalars(select(m).where(m.session_pk == row.pk).order_by(m.seq))
            messages = [Message(r.role, r.text, r.start, r.end, r.created) for r in rows]
            rows = s.execute(
                select(ss.seq, SegmentRow).join(SegmentRow, SegmentRow.id == ss.segment_id)
                .where(ss.session_pk == row.pk).order_by(ss.seq)
            )  # fmt: skip
            segments = [Segment(r.id, seq, r.file, r.bytes, r.sha256, r.meta) for seq, r in rows]
            info = _info(row)
        # Payload files never change once written, so they are copied after the lock is let go.
        files = [(segment, self.segment_path(segment)) for segment in segments]
        return bundle.write(path, info, messages, files)

    def import_(
        self, path: str | os.PathLike, *, tenant: str = DEFAULT_TENANT,
        session_id: str | None = None,
    ) -> SessionInfo:  # fmt: skip
        """The session in the bundle at `path` (written by `export_session`, in any store) as
        `session_id` (default: the bundle's) of `tenant`, whichever tenant exported it. The bundle
        is checked first (CorruptBundle, or CorruptPayload naming the member); its payloads are
        copied in durably, then the session, its messages and segments commit in one
        transaction. On any failure neither files nor rows are left."""
        check_id(tenant, "tenant")
        with bundle.Reader(path) as b:
            m = b.manifest
            session_id = m.session.id if session_id is None else check_id(session_id, "session id")
            messages = [_message(x.role, x.text, x.start, x.end, x.created) for x in m.messages]
            if self.session_info(session_id, tenant=tenant) is not None:
                raise self._exists(tenant, session_id)  # before copying anything
            names = b.copy_payloads(self.root)
        when = now()
        try:
            with self._write.begin() as s:
                _ensure_tenant(s, tenant)
                row = SessionRow(
                    tenant=tenant, session_id=session_id, fingerprint=m.session.fingerprint,
                    memory=m.session.memory, tokens=m.session.tokens, parent=m.session.parent,
                    created=m.session.created, updated=when,
                )  # fmt: skip
                s.add(row)
                s.flush()
                self._add_messages(s, row.pk, messages)
                segments = [
                    SegmentRow(file=name, bytes=x.bytes, sha256=x.sha256, meta=x.meta, created=when)
                    for name, x in zip(names, m.segments, strict=True)
                ]
                s.add_all(segments)
                s.flush()
                s.add_all(
                    SessionSegment(session_pk=row.pk, seq=seq, segment_id=segment.id)
                    for seq, segment in enumerate(segments)
                )
                info = _info(row)
        except BaseException as e:
            payloads.discard(self.root, names)
            if isinstance(e, IntegrityError):  # another writer made it since the check above
                raise self._exists(tenant, session_id) from e
            raise
        return info

    # -- messages ---------------------------------------------------------------------------------

    def add_message(
        self, session_id: str, role: str, text: str, start: int, end: int, *,
        tenant: str = DEFAULT_TENANT,
    ) -> Message:  # fmt: skip
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

    def messages(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> list[Message]:
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
        session_id: str,
        tensors: dict[str, torch.Tensor],
        meta: dict,
        tokens: int,
        messages: list[tuple[str, str, int, int]] = (),
        *,
        tenant: str = DEFAULT_TENANT,
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

    def segments(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> list[Segment]:
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
        row = self._segment_row(segment)
        return payloads.read(payloads.resolve(self.root, row.file), row.bytes, row.sha256)

    def open_segment(self, segment: Segment) -> MappedPayload:
        """The segment's payload opened for reading in parts (memory-mapped): each part is
        verified against its checksum when first read, so opening costs what is read."""
        row = self._segment_row(segment)
        return MappedPayload(payloads.resolve(self.root, row.file), row.bytes, row.sha256)

    def segment_path(self, segment: Segment) -> Path:
        """Where the segment's payload file lives."""
        return payloads.resolve(self.root, segment.file)

    # -- search -----------------------------------------------------------------------------------

    def search(
        self, query: str, *, tenant: str = DEFAULT_TENANT, k: int = 5,
        model: search_.QueryModel | None = None, method: str = "bm25",
    ) -> list[search_.Hit]:  # fmt: skip
        """The `k` messages of this tenant's sessions (no other tenant's) that best answer
        `query`, best first: `Hit(session_id, message=(role, text), start, end, text, score)`.

        `method`: "bm25" (the default), BM25 over the message texts, no model needed; "kv", the
        model reads `query` and its queries at the global layers search the FAISS index each
        save wrote (sessions made with `model`'s weights only); "hybrid", their reciprocal-rank
        fusion. BM25 is the default because it won the measurement (benchmarks/RESULTS.md,
        Cross-session search): KV search is near chance on a 270M-0.5B model, and fusing it in
        costs BM25 hits. `model`: `agentmem.search.QueryEncoder(lm)` (any object with its
        `fingerprint`, `vector` and `decode`); the store imports no model code.
        """
        check_id(tenant, "tenant")
        return search_.search(self, query, tenant=tenant, k=k, model=model, method=method)

    # -- leases -----------------------------------------------------------------------------------

    def acquire_lease(self, session_id: str, holder: str, *, ttl_s: float = 30.0,
                      tenant: str = DEFAULT_TENANT) -> leases.Lease | None:  # fmt: skip
        """Take (or renew) the right to write `session_id` for `ttl_s` seconds as `holder` (a
        server's id); None while another holder's lease runs (`agentmem.persistence.leases`)."""
        _check(tenant, session_id)
        return leases.acquire(self._write, tenant, session_id, holder, ttl_s)

    def release_lease(self, session_id: str, holder: str, *, tenant: str = DEFAULT_TENANT) -> None:
        _check(tenant, session_id)
        leases.release(self._write, tenant, session_id, holder)

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

    def _segment_row(self, segment: Segment) -> SegmentRow:
        if not isinstance(segment, Segment):
            raise TypeError(f"expected a Segment, got {type(segment).__name__}")
        with self._read() as s:
            row = s.get(SegmentRow, segment.id)
        if row is None or row.file != segment.file:
            raise SegmentNotFound(
                f"segment {segment.id} ({segment.file!r}) is not in this store; "
                "read the segments Store.segments returns"
            )
        return row

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
