"""The one thread that runs the model for `agentmem serve`: requests wait in a bounded queue; up to
`max_active` replies are decoded at once, one step each in turn, so that sessions interleave
token by token; one session's requests take turns (a session is never in two replies at once).
Servers that share a store take a session's lease in its database before a reply on it, so that
no two write it at once; one that finds another wrote the session since reads it afresh.

A reply's history is prefilled one chunk (`MemoryConfig.exec_chunk` tokens) per turn, so a long
one does not hold up the others' decoding."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agentmem import chat
from agentmem.chat import engine
from agentmem.server.schema import ApiError

LEASE_TTL_S = 30.0  # a dead server's sessions are free again after this


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


@dataclass
class Job:
    """One reply: what it asks for, where its items go (`emit`, called on the worker thread with
    each `chat.Event`, then the `chat.Outcome`, or an exception), and whether its client left."""

    reply: chat.Reply
    emit: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)
    events: Iterator | None = None
    decoding: bool = False
    leased: float | None = None  # when its session's lease was last taken or renewed

    @property
    def key(self) -> tuple | None:
        """The conversation it continues (None: one of its own)."""
        r = self.reply
        return None if r.session_id is None else (r.tenant, r.session_id)


class Worker:
    def __init__(
        self,
        store: Any,
        *,
        max_queue: int = 64,
        max_active: int = 8,
        on_step: Callable[[float], None] | None = None,
        holder: str | None = None,
    ) -> None:
        """`on_step`: given the seconds of each decoding step of a reply (after its first).
        `holder`: this server's name in the store's leases (default: one of its own)."""
        self.store, self.max_queue, self.max_active = store, max_queue, max_active
        self.on_step = on_step
        # A server restarted under the same name takes its leases back at once; other servers
        # wait for a dead one's leases to expire.
        self.holder = holder or f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []
        self.busy: set[tuple] = set()  # the conversations of active replies
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="agentmem-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel what runs, drop what waits, and end the thread."""
        with self._cond:
            self._stopping = True
            for job in [*self.pending, *self.active]:
                job.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull
            self.pending.append(job)
            self._cond.notify_all()

    def is_busy(self, tenant: str, session_id: str) -> bool:
        """Whether a reply of this conversation runs or waits."""
        key = (tenant, session_id)
        with self._cond:
            return key in self.busy or any(job.key == key for job in self.pending)

    def depth(self) -> tuple[int, int]:
        """(waiting, running) replies."""
        with self._cond:
            return len(self.pending), len(self.active)

    def _admit(self) -> None:
        """Start waiting replies, oldest first, whose conversation is not in a running one."""
        for job in list(self.pending):
            if len(self.active) >= self.max_active:
                break
            if job.cancel.is_set():  # its client left before it started
                self.pending.remove(job)
                job.emit(ConnectionAbortedError("the client left before the reply started"))
                continue
            if job.key is not None and job.key in self.busy:
                continue
            self.pending.remove(job)
            if job.key is not None and not self._lease(job):
                continue
            if job.key is not None:
                self.busy.add(job.key)
            job.events = chat.events(job.reply, store=self.store, cancel=job.cancel, pauses=True)
            self.active.append(job)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._admit()
                while not self.active and not self._stopping:
                    self._cond.wait()
                    self._admit()
                if self._stopping and not self.active:
                    return
                running = list(self.active)
            for job in running:
                self._step(job)
                if job.leased is not None and time.monotonic() - job.leased > LEASE_TTL_S / 3:
                    self._renew(job)

    def _step(self, job: Job) -> None:
        """Advance one reply by one item. Its end (the outcome, or an error) is emitted once
        the reply left the running ones, so that its client may use the session at once."""
        started = time.perf_counter()
        try:
            item = next(job.events)
        except StopIteration:
            self._release(job)
            return
        except Exception as e:  # handed to the request; the worker goes on
            self._release(job)
            job.emit(e)
            return
        if item is None:  # a pause in its prefill: the next reply's turn
            return
        if job.decoding and self.on_step is not None:
            self.on_step(time.perf_counter() - started)
        job.decoding = True  # its first item came: what follows are decoding steps
        if isinstance(item, chat.Outcome):
            self._release(job)
        job.emit(item)

    def _release(self, job: Job) -> None:
        with self._cond:
            if job in self.active:
                self.active.remove(job)
            self.busy.discard(job.key)
        if job.leased is not None:
            job.leased = None
            tenant, session_id = job.key
            self.store.release_lease(session_id, self.holder, tenant=tenant)

    # -- leases (servers sharing a store) ---------------------------------------------------------

    def _lease(self, job: Job) -> bool:
        """Take the lease of the job's session; False (the job answered 409) while another
        server holds it. Held by another since this server last had it, the session is read
        afresh from the store: what this process holds of it is out of date."""
        if self.store is None:
            return True
        tenant, session_id = job.key
        try:
            lease = self._acquire(job)
        except Exception as e:  # the database is unreachable: the request fails, not the worker
            job.emit(e)
            return False
        if lease is None:
            job.emit(ApiError(409, f"session {session_id!r} is being written by another server; "
                              "retry soon", code="session_leased",
                              headers={"Retry-After": "1"}))  # fmt: skip
            return False
        if lease.previous not in ("", self.holder):
            engine.forget(job.reply.model, session_id, self.store, tenant)
        job.leased = time.monotonic()
        return True

    def _renew(self, job: Job) -> None:
        """Keep a long reply's lease; lost (this server stalled past its time to live, and
        another took it), the reply is cancelled."""
        if self._acquire(job) is None:
            job.cancel.set()
        job.leased = time.monotonic()

    def _acquire(self, job: Job):
        """Take or renew the lease of the job's session (None: another server holds it)."""
        tenant, session_id = job.key
        return self.store.acquire_lease(session_id, self.holder, ttl_s=LEASE_TTL_S, tenant=tenant)
