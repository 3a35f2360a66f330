"""Search across a tenant's sessions (`Store.search`): BM25 over the message texts (the default,
the measured best), KV search of the FAISS indexes saved with each segment, and their fusion.
The store reads a query with a duck-typed `model` (`agentmem.search.QueryEncoder`); it imports
no model code itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np
import torch

from agentmem.persistence.records import Message, SessionInfo

# Segment tensors (serialized faiss indexes, uint8) and the segment meta key that describes them.
UNITS, TAIL, META = "search.units", "search.tail", "search"
# A vector's FAISS id names its token span and representative slot: start << 24 | length << 8 | r.
LENGTH_BITS, SLOT_BITS = 16, 8
METHODS = ("bm25", "kv", "hybrid")  # the first is the default (the measured best)
RRF_K = 60  # reciprocal-rank fusion: score = sum over methods of 1 / (RRF_K + rank)


def span_id(start: int, length: int, slot: int) -> int:
    if not (0 < length < 1 << LENGTH_BITS and 0 <= slot < 1 << SLOT_BITS):
        raise ValueError(f"a span of {length} tokens with slot {slot} has no search id")
    return (start << (LENGTH_BITS + SLOT_BITS)) | (length << SLOT_BITS) | slot


def id_span(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each id's token span."""
    start = ids >> (LENGTH_BITS + SLOT_BITS)
    return start, start + ((ids >> SLOT_BITS) & ((1 << LENGTH_BITS) - 1))


@dataclass(frozen=True)
class Hit:
    """A message of a stored session that answers a search: `message` (role, text); `start`,
    `end` and `text` the token span and text that matched (a memory unit's for KV search, the
    whole message's for BM25); `score` by the method asked for (higher is better)."""

    session_id: str
    message: tuple[str, str]
    start: int
    end: int
    text: str
    score: float


class QueryModel(Protocol):
    """What `Store.search` needs of a model (`agentmem.search.QueryEncoder(lm)` is one)."""

    fingerprint: dict

    def vector(self, text: str, memory: dict) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class _Found:
    session: str
    message: int  # index into the session's messages
    start: int
    end: int
    score: float


def search(
    store, query: str, *, tenant: str, k: int, model: QueryModel | None, method: str
) -> list[Hit]:
    """See `Store.search`."""
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {METHODS}")
    if not isinstance(query, str) or not query.strip():
        raise ValueError("a search needs a non-empty query string")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if method != "bm25" and model is None:
        raise ValueError(
            f"method={method!r} reads the query with the sessions' model: pass "
            "model=agentmem.search.QueryEncoder(lm), or search with method='bm25'"
        )
    infos = store.sessions(tenant=tenant)
    messages = {info.id: store.messages(info.id, tenant=tenant) for info in infos}
    depth = max(4 * k, 20)  # candidates each method gives the fusion
    rankings = []
    if method in ("kv", "hybrid"):
        rankings.append(_kv(store, query, infos, messages, model, tenant, depth))
    if method in ("bm25", "hybrid"):
        rankings.append(_bm25(query, messages, depth))
    if method == "hybrid":
        found = _fuse(rankings)
    else:
        found = rankings[0]
    return [_hit(store, f, messages, model, tenant) for f in found[:k]]


def _fuse(rankings: list[list[_Found]]) -> list[_Found]:
    """Reciprocal-rank fusion by message; a message keeps the span of its first (KV) finding."""
    fused: dict[tuple[str, int], _Found] = {}
    for ranking in rankings:
        for rank, f in enumerate(ranking):
            key = (f.session, f.message)
            if key not in fused:
                fused[key] = _Found(f.session, f.message, f.start, f.end, 0.0)
            fused[key].score += 1.0 / (RRF_K + rank + 1)
    return sorted(fused.values(), key=lambda f: -f.score)


def _hit(store, f: _Found, messages, model, tenant) -> Hit:
    m = messages[f.session][f.message]
    text = m.text
    if (f.start, f.end) != (m.start, m.end):  # a unit's span: its own text
        tokens = _tokens(store, f.session, tenant)
        text = model.decode(tokens[f.start : f.end].tolist())
    return Hit(f.session, (m.role, m.text), f.start, f.end, text, float(f.score))


# -- BM25 ----------------------------------------------------------------------------------------


def _bm25s():
    """bm25s, imported when first searched with. Importing it runs a JAX top-k where JAX is
    installed, and JAX then takes 75% of every GPU's memory for itself: unless the process
    imported JAX already (its own choice), bm25s is imported with JAX hidden (numpy top-k)."""
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    hide = "jax" not in sys.modules
    if hide:
        sys.modules["jax"] = None  # `import jax` raises ImportError
    try:
        import bm25s
    finally:
        if hide:
            del sys.modules["jax"]
    return bm25s


def _bm25(query: str, messages: dict[str, list[Message]], depth: int) -> list[_Found]:
    bm25s = _bm25s()
    docs = [(sid, i, m) for sid, ms in messages.items() for i, m in enumerate(ms) if m.text]
    if not docs:
        return []
    corpus = bm25s.tokenize([m.text for _, _, m in docs], stopwords="en", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    asked = bm25s.tokenize([query], stopwords="en", show_progress=False)
    if not set(asked.vocab) & set(corpus.vocab):  # every query word is a stopword or unseen
        return []
    rows, scores = retriever.retrieve(
        asked, k=min(depth, len(docs)), show_progress=False, backend_selection="numpy"
    )
    found = []
    for row, score in zip(rows[0], scores[0], strict=True):
        if score > 0:
            sid, i, m = docs[int(row)]
            found.append(_Found(sid, i, m.start, m.end, float(score)))
    return found


# -- KV search -----------------------------------------------------------------------------------


def _kv(store, query, infos: list[SessionInfo], messages, model, tenant, depth) -> list[_Found]:
    found: list[_Found] = []
    for info in infos:
        if info.fingerprint != model.fingerprint:
            continue  # another model's keys: BM25 still reaches its messages
        index = session_index(store, info.id, tenant=tenant)
        if index is None or index.ntotal == 0:
            continue
        vector = np.ascontiguousarray(model.vector(query, info.memory), dtype=np.float32)
        if vector.shape != (index.d,):
            raise ValueError(
                f"the query vector has shape {vector.shape}, session {info.id!r}'s index {index.d} "
                "dimensions: search with the model the session was made with"
            )
        found += _best_messages(index, vector[None], messages[info.id], info.id, depth)
    return sorted(found, key=lambda f: -f.score)[:depth]


def _best_messages(index, vector, messages: list[Message], session: str, depth: int):
    """The `depth` best messages of one session: a unit's score is its best slot's, a message's
    its best unit's; a unit belongs to the message it overlaps most."""
    starts = np.array([m.start for m in messages], dtype=np.int64)
    ends = np.array([m.end for m in messages], dtype=np.int64)
    want = min(index.ntotal, 4 * depth)
    while True:
        scores, ids = index.search(vector, want)
        best: dict[int, _Found] = {}
        unit_starts, unit_ends = id_span(ids[0])
        for score, s, e in zip(scores[0], unit_starts, unit_ends, strict=True):
            if not len(messages):
                break
            overlap = np.minimum(e, ends) - np.maximum(s, starts)
            i = int(overlap.argmax())
            if overlap[i] > 0 and i not in best:
                best[i] = _Found(session, i, int(s), int(e), float(score))
        if len(best) >= depth or want >= index.ntotal:
            return list(best.values())[:depth]
        want = min(index.ntotal, 2 * want)


def session_index(store, session_id: str, *, tenant: str):
    """One `IndexIDMap2` for the session: every segment's units and the newest segment's
    not yet packed tokens (None if no segment carries an index)."""
    segments = [s for s in store.segments(session_id, tenant=tenant) if s.meta.get(META)]
    if not segments:
        return None
    parts = [_read(store, s, UNITS)[UNITS] for s in segments]
    parts.append(_read(store, segments[-1], TAIL)[TAIL])
    merged = faiss.deserialize_index(parts[0].numpy())
    for part in parts[1:]:
        merged.merge_from(faiss.deserialize_index(part.numpy()))
    return merged


def _read(store, segment, *names: str) -> dict[str, torch.Tensor]:
    """Some tensors of a segment's payload, each verified against the checksum its file records
    (an index is parsed by C++ code: bytes that are not what was written never reach it)."""
    payload = store.open_segment(segment)
    return {name: payload.tensor(name) for name in names}


def _tokens(store, session_id: str, tenant: str) -> torch.Tensor:
    parts = [
        _read(store, s, "session.tokens")["session.tokens"]
        for s in store.segments(session_id, tenant=tenant)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
