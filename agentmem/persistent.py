"""Sessions that outlive their process: a `Session` whose memory and messages live in a `Store`.

Every save appends one segment: the units packed since the last save, the tokens added since, and
the parts that change in place (sinks, local and sliding windows, the next logits), so a save costs
what changed, not the whole memory. Resuming reads the windows of the last segment and every
segment's tokens and representatives; unit keys and values stay memory-mapped in their files and
are read (and verified) when a step first retrieves them, so resuming costs what it reads, not the
session's length. The next greedy tokens are the uninterrupted session's. A session records the
model it was made with (`fingerprint`) and its memory layout; opening it with another is refused.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from functools import partial
from pathlib import Path

import torch

from agentmem.config import MemoryConfig
from agentmem.memory.store import LazyRows
from agentmem.persistence import Store
from agentmem.persistence import records as store_records
from agentmem.persistence.mapped import MappedPayload
from agentmem.persistence.search import META as SEARCH
from agentmem.search import segment_index
from agentmem.session import LanguageModel, Message, Session

# Tensors a segment holds for every memory layer's units (joined across segments on resume).
UNIT_PARTS = ("unit_k", "unit_v", "reps")
# Config entries that say nothing about the weights (where they were loaded from, the release).
VOLATILE = ("_name_or_path", "transformers_version", "_attn_implementation", "dtype", "torch_dtype")


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per model


def fingerprint(lm: LanguageModel) -> dict:
    """What a saved memory depends on: the model's architecture, config and tokenizer, its
    dtype and rope parameters (sha256 of the config and of the tokenizer). Computed once."""
    if lm not in _fingerprints:
        config = {k: v for k, v in lm.model.config.to_dict().items() if k not in VOLATILE}
        dtype = next(lm.model.parameters()).dtype
        _fingerprints[lm] = {
            "model_type": lm.model.config.model_type,
            "config_sha256": _sha256(json.dumps(config, sort_keys=True).encode()),
            "tokenizer_sha256": _tokenizer_sha256(lm.tokenizer),
            "dtype": str(dtype).removeprefix("torch."),
            "rope": json.loads(json.dumps(config.get("rope_parameters"), default=str)),
        }
    return _fingerprints[lm]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tokenizer_sha256(tokenizer) -> str:
    """Of its tokenizer.json where it was loaded from a directory (fast), else of its vocabulary
    in id order (a 262K vocabulary takes about 0.4 s)."""
    saved = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "tokenizer.json"
    if saved.is_file():
        return _sha256(saved.read_bytes())
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return _sha256("\0".join(str(token) for token in tokens).encode())


def _lazy_rows(payloads: list[MappedPayload], name: str) -> LazyRows:
    """The rows of tensor `name` of every payload, joined along dim 2, read when asked for."""
    shapes = [p.shape(name) for p in payloads]
    pieces = [(shape[2], partial(p.rows, name)) for p, shape in zip(payloads, shapes, strict=True)]
    shape = (*shapes[0][:2], sum(s[2] for s in shapes), *shapes[0][3:])
    return LazyRows(pieces, shape, payloads[0].dtype(name))


def _message(record: store_records.Message) -> Message:
    return Message(record.role, record.text, record.start, record.end, record.created)


class PersistentSession(Session):
    """A `Session` kept in `store` as `session_id` of `tenant`: created if new, else resumed.

    The messages `append`, `generate` and `stream` record are stored with the save that holds their
    tokens, in one transaction; with `autosave` each of them saves. A crash loses at most what
    was not saved yet. `fork` copies the session, whole or its first n tokens, without copying
    its payloads.
    """

    def __init__(
        self, lm: LanguageModel, store: Store, session_id: str, *, tenant: str = "default",
        memory: MemoryConfig | None = None, progress: bool = True, autosave: bool = True,
    ) -> None:  # fmt: skip
        self.store, self.id, self.tenant, self.autosave = store, session_id, tenant, autosave
        info = store.session_info(session_id, tenant=tenant)
        if info is not None:
            saved = MemoryConfig(**info.memory)
            if memory is not None and not memory.same_layout(saved):
                raise ValueError(
                    f"session '{session_id}' was saved with the memory layout {saved!r}, not "
                    f"{memory!r}; open it without memory= (or with its own layout)"
                )
            memory = memory or saved  # its own layout, found as this call asks (`index`)
        super().__init__(lm, memory or lm.memory, progress=progress)
        mine = fingerprint(lm)
        if info is None:
            store.create_session(
                session_id, fingerprint=mine, memory=self.memory.model_dump(), tenant=tenant
            )
            self._mark_saved()
        else:
            if info.fingerprint != mine:
                raise ValueError(
                    f"session '{session_id}' was made with another model ({info.fingerprint}); "
                    f"this one is {mine}: open it with the model it was made with"
                )
            self._resume()

    # -- saving and resuming ---------------------------------------------------------------------

    def save(self) -> bool:
        """Append what changed since the last save as one segment; False if nothing had."""
        if len(self) == self._saved_length:
            return False
        # The units and the stream's tokens since the last save (a generated one not yet fed: meta).
        state = self.state_dict(units_from=self._saved_units, tokens_from=self._saved_fed)
        # Written and indexed from host memory (a session on an accelerator copies once, here).
        state["tensors"] = {name: t.cpu().contiguous() for name, t in state["tensors"].items()}
        tensors = dict(state["tensors"])
        index, state["meta"][SEARCH] = segment_index(state)  # FAISS: the new units, the windows
        tensors.update(index)
        del state["meta"]["session"]["messages"]  # the store holds them, once
        unsaved = [(m.role, m.text, m.start, m.end) for m in self._messages[self._saved_messages :]]
        self.store.write_segment(
            self.id, tensors, state["meta"], tokens=len(self), messages=unsaved, tenant=self.tenant
        )
        self._mark_saved()
        return True

    def _mark_saved(self) -> None:
        self._saved_units = [layer.units.n_units for layer in self.cache.memory_layers]
        self._saved_fed, self._saved_length = len(self.tokens), len(self)
        self._saved_messages = len(self._messages)

    def _resume(self) -> None:
        """Read the windows of the newest save, every save's tokens and representatives; unit
        keys and values stay in their files (memory-mapped) until a step retrieves them."""
        segments = self.store.segments(self.id, tenant=self.tenant)
        if not segments:
            self._mark_saved()
            return
        payloads = [self.store.open_segment(segment) for segment in segments]
        newest, meta = payloads[-1], segments[-1].meta
        tensors = {
            name: newest.tensor(name) for name in newest.names()
            if name.rpartition(".")[2] not in UNIT_PARTS
        }  # fmt: skip
        tensors["session.tokens"] = torch.cat([p.tensor("session.tokens") for p in payloads])
        unit_names = {n for p in payloads for n in p.names() if n.rpartition(".")[2] in UNIT_PARTS}
        for name in unit_names:
            holding = [p for p in payloads if name in p.names()]
            if name.endswith(".reps"):
                tensors[name] = torch.cat([p.tensor(name) for p in holding], dim=2)
            else:
                tensors[name] = _lazy_rows(holding, name)
        for layer_meta in meta["layers"]:
            if layer_meta["kind"] == "memory":
                layer_meta["units_from"] = 0
        meta["session"]["tokens_from"] = 0
        self.load_state_dict({"meta": meta, "tensors": tensors})
        self._messages = [_message(m) for m in self.store.messages(self.id, tenant=self.tenant)]
        self._mark_saved()

    # -- messages --------------------------------------------------------------------------------

    def _record(self, role: str, text: str, start: int) -> None:
        super()._record(role, text, start)  # stored with the save that holds its tokens
        if self.autosave:
            self.save()

    def fork(self, new_id: str, at: int | None = None) -> PersistentSession:
        """A copy of this session as `new_id` (this one saved first); the copy shares its payloads.

        `at`: the copy holds only the first `at` tokens (0 <= at <= len(self), counted as `len`
        counts them: a generated token not yet fed is the last one). It shares the segments of
        the newest save that holds at most `at` tokens, then is fed this session's tokens from
        there up to `at` in one step and saved: its next greedy tokens are those of a session
        fed the same tokens in the same steps. A token left pending at that save is fed with
        them (the copy then has none pending); a fork at a save keeps that save's pending token.
        The copy keeps the messages that end at or before `at` (one cut by `at` is left out).
        """
        self.save()
        at = len(self) if at is None else at
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= len(self):
            raise ValueError(f"fork at= must be an int in [0, {len(self)}] (tokens), got {at!r}")
        points = self._save_points()
        kept = sum(point <= at for point in points)  # saves only grow the session
        base = points[kept - 1] if kept else 0
        self.store.fork(self.id, new_id, tenant=self.tenant, segments=kept, tokens=base)
        copy = PersistentSession(
            self.lm, self.store, new_id, tenant=self.tenant, progress=self.progress,
            autosave=self.autosave,
        )  # fmt: skip
        if at > base:
            copy.append_tokens((self.tokens + self._pending)[base:at])
            copy._messages += [m for m in self._messages if base < m.end <= at]
            copy.save()
        return copy

    def _save_points(self) -> list[int]:
        """The session's length (`len`) at each of its saves, oldest first (it is saved): a save
        records the tokens fed before it (`tokens_from`) and the one left pending."""
        metas = [s.meta["session"] for s in self.store.segments(self.id, tenant=self.tenant)]
        fed = [meta["tokens_from"] for meta in metas[1:]] + [len(self.tokens)]
        return [n + len(meta["pending"]) for n, meta in zip(fed, metas, strict=True)]

    def export(self, path: str | Path) -> Path:
        """Save, then write this session to one bundle file at `path` (`Store.import_` reads it
        into any store, for any tenant); returns its path."""
        self.save()
        return self.store.export_session(self.id, path, tenant=self.tenant)
