"""The Python API: a `LanguageModel` (a wrapped model and its tokenizer) and its `Session`s.

A session is one memory stream. `append` streams text into it (chunked prefill, the last token in a
step of its own so that the token that answers retrieves for itself); `generate` / `stream`
continue greedily; each records a message (role, text, token span); `recalled` says which past
tokens, and which messages, the last step retrieved. `state_dict` / `load_state_dict` are the one
way in and out of a session (stored sessions: `agentmem.persistent`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import torch
from torch import nn

from agentmem.config import MemoryConfig
from agentmem.generate import decode_one_token, greedy, prefill_steps
from agentmem.hf.cache import AgentMemCache
from agentmem.hf.wrap import new_cache, wrap

# Prefills shorter than this show no progress bar.
PROGRESS_MIN_TOKENS = 4096


@dataclass(frozen=True)
class Recall:
    """A memory unit retrieved by the last step: its token span, its text, by which layers, and
    the messages (role, text) its tokens came from. `ranks[i]`: its rank in layer `layers[i]`
    (0: the unit of largest mass; the best over the layer's KV heads), or None where that layer
    ranked nothing (it took every unit, or found them through the index, or in stream order)."""

    start: int
    end: int
    text: str
    layers: tuple[int, ...]
    messages: tuple[tuple[str, str], ...] = ()
    ranks: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class Message:
    """What one `append` or one generation added: its role, text and token span [start, end)."""

    role: str
    text: str
    start: int
    end: int
    created: datetime | None = None  # when a store recorded it


class LanguageModel:
    """A causal LM wrapped with agentmem, and its tokenizer.

    Args:
        model: a transformers causal LM of a supported family (wrapped in place).
        tokenizer: its tokenizer.
        memory: the default memory layout of new sessions.
    """

    def __init__(self, model: nn.Module, tokenizer, memory: MemoryConfig | None = None) -> None:
        self.memory = memory or MemoryConfig()
        self.model = wrap(model, self.memory)
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def session(
        self, session_id: str | None = None, *, store=None, tenant: str = "default",
        memory: MemoryConfig | None = None, progress: bool = True, autosave: bool = True,
    ) -> Session:  # fmt: skip
        """A memory stream: fresh and in this process only, or with `store` (an
        `agentmem.Store`) the stored session `session_id` of `tenant`, created if new and
        resumed if not (`agentmem.persistent.PersistentSession`).

        `memory`: the layout of a new session (default: this model's).
        """
        if store is None:
            if session_id is not None:
                raise ValueError("a session id names a stored session: pass store=agentmem.Store()")
            return Session(self, memory or self.memory, progress=progress)
        if session_id is None:
            raise ValueError("a stored session needs a session id")
        from agentmem.persistent import PersistentSession  # the store sits above sessions

        return PersistentSession(
            self, store, session_id, tenant=tenant, memory=memory, progress=progress,
            autosave=autosave,
        )  # fmt: skip


class Session:
    """One memory stream of a `LanguageModel`; see the module docstring."""

    def __init__(self, lm: LanguageModel, memory: MemoryConfig, *, progress: bool = True) -> None:
        self.lm = lm
        self.memory = memory
        self.progress = progress
        self.cache: AgentMemCache = new_cache(lm.model, memory)
        self.tokens: list[int] = []  # every token in memory, in stream order
        self._pending: list[int] = []  # generated tokens not yet fed to the model
        self._next_logits: torch.Tensor | None = None  # [1, V] after the last fed token
        self._messages: list[Message] = []

    def __len__(self) -> int:
        """Tokens in memory, generated ones included."""
        return len(self.tokens) + len(self._pending)

    def state_dict(self, units_from: list[int] | None = None, tokens_from: int = 0) -> dict:
        """The session's memory (`AgentMemCache.state_dict`) plus what the next step needs: the
        stream's tokens (from `tokens_from` on: a save that wrote the others), tokens generated
        but not yet fed, the next logits, and the messages. Views, not copies."""
        state = self.cache.state_dict(units_from)
        tokens = self.tokens[tokens_from:]
        state["tensors"]["session.tokens"] = torch.tensor(tokens, dtype=torch.int64)
        if self._next_logits is not None:
            state["tensors"]["session.next_logits"] = self._next_logits
        messages = [[m.role, m.text, m.start, m.end] for m in self._messages]
        state["meta"]["session"] = {
            "pending": list(self._pending), "messages": messages, "tokens_from": tokens_from,
        }  # fmt: skip
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the session that gave `state` (with every unit) stood: the next
        greedy tokens are the ones it would have produced. Tensors move to the model's device."""
        device = self.lm.device
        tensors = {name: t.to(device) for name, t in state["tensors"].items()}
        session = state["meta"]["session"]
        if session.get("tokens_from", 0) != 0:
            raise ValueError("a state without its first tokens cannot be loaded; join the saves")
        self.cache.load_state_dict({"meta": state["meta"], "tensors": tensors})
        self.tokens = tensors.pop("session.tokens").tolist()
        self._next_logits = tensors.pop("session.next_logits", None)
        self._pending = [int(i) for i in session["pending"]]
        self._messages = [Message(*m) for m in session.get("messages", [])]

    def append(self, text: str, role: str = "user") -> int:
        """Stream `text` into memory as a message of `role`; returns the tokens it added.

        Each append is tokenized on its own (text split across appends may tokenize differently
        from the same text in one)."""
        if not isinstance(text, str) or not text:
            raise ValueError("append needs a non-empty string")
        start = len(self)
        ids = self.lm.tokenizer(text, add_special_tokens=start == 0).input_ids
        added = self.append_tokens(ids)
        self._record(role, text, start)
        return added

    def append_tokens(self, ids: list[int]) -> int:
        """Stream token ids into memory; returns how many were added (recorded as no message)."""
        for _ in self.append_tokens_stepwise(ids):
            pass
        return len(ids)

    def append_tokens_stepwise(self, ids: list[int]) -> Iterator[None]:
        """`append_tokens`, pausing after each prefill chunk (`agentmem serve` decodes other
        sessions' replies there, so that a long history does not hold them up)."""
        if not ids:
            raise ValueError("append_tokens needs at least one token id")
        vocab = self.lm.model.config.vocab_size
        if any(not 0 <= int(i) < vocab for i in ids):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return self._feed(self._pending + [int(i) for i in ids])

    def _feed(self, ids: list[int]) -> Iterator[None]:
        model, device = self.lm.model, self.lm.device
        batch = torch.tensor([ids], device=device)
        if len(ids) > 1:
            yield from prefill_steps(
                model,
                self.cache,
                batch[:, :-1],
                chunk=self.memory.exec_chunk,
                progress=self.progress and len(ids) >= PROGRESS_MIN_TOKENS,
            )
        # The last token gets a step of its own: it retrieves for itself, not with its chunk.
        self._next_logits = decode_one_token(model, self.cache, batch[:, -1])
        self.tokens.extend(ids)
        self._pending = []

    def generate(self, max_new_tokens: int = 16, role: str = "assistant") -> str:
        """Greedy continuation of everything in memory, as text (stops at end of sequence),
        recorded as a message of `role`."""
        return "".join(self.stream(max_new_tokens, role))

    def stream(self, max_new_tokens: int = 16, role: str = "assistant") -> Iterator[str]:
        """The same continuation as `generate`, yielded as text pieces while it decodes; what
        it produced (also if the caller stops early) is recorded as a message of `role`."""
        start, pieces = len(self), []
        try:
            for piece in self._pieces(max_new_tokens):
                pieces.append(piece)
                yield piece
        finally:
            if len(self) > start:
                self._record(role, "".join(pieces), start)

    def _record(self, role: str, text: str, start: int) -> None:
        self._messages.append(Message(role, text, start, len(self)))

    def record(self, role: str, text: str, start: int) -> None:
        """Record the tokens from `start` to the end of memory as a message of `role` with
        `text` (tokens fed by `append_tokens` or produced by `generate_tokens`, which record
        nothing themselves)."""
        if not 0 <= start < len(self):
            raise ValueError(f"a message starts inside memory: 0 <= start < {len(self)}")
        self._record(role, text, start)

    def messages(self) -> list[Message]:
        """Every message in memory, in order, with its token span."""
        return list(self._messages)

    def _pieces(self, max_new_tokens: int) -> Iterator[str]:
        ids = self.generate_tokens(max_new_tokens)
        stop = self._stop_ids()
        produced: list[int] = []
        emitted = ""
        for token_id in ids:
            if token_id in stop:
                break
            produced.append(token_id)
            text = self.lm.tokenizer.decode(produced, skip_special_tokens=True)
            # Hold back an incomplete multi-byte character until it completes.
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text

    def generate_tokens(self, max_new_tokens: int = 16) -> Iterator[int]:
        """Greedy continuation as token ids; every generated token enters memory."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self._pending:
            for _ in self._feed(self._pending):
                pass
        if self._next_logits is None:
            raise ValueError("the session is empty: append text before generating")
        for token_id in greedy(
            self.lm.model,
            self.cache,
            self._next_logits,
            max_new_tokens=max_new_tokens,
            stop_ids=self._stop_ids(),
        ):
            if self._pending:
                # greedy fed the previous token to the model to produce this one
                self.tokens.extend(self._pending)
            self._pending = [token_id]
            yield token_id
        self._next_logits = None

    def _stop_ids(self) -> set[int]:
        eos = self.lm.model.generation_config.eos_token_id
        if eos is None:
            eos = self.lm.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()

    def recalled(self) -> list[Recall]:
        """Memory units the last step retrieved, in stream order, across layers and heads."""
        by_span: dict[tuple[int, int], list[tuple[int, int | None]]] = {}
        for layer_idx, layer in enumerate(self.cache.layers):
            state = layer.state
            if getattr(state, "last_ids", None) is None:
                continue
            best: dict[int, int] = {}  # unit -> its best rank over the KV heads (batch row 0)
            for head in state.last_ids[0].tolist():
                for rank, unit in enumerate(head):
                    best[unit] = min(rank, best.get(unit, rank))
            for unit in sorted(best):
                rank = best[unit] if state.last_ranked else None
                by_span.setdefault(state.units.span(unit), []).append((layer_idx, rank))
        decode = self.lm.tokenizer.decode
        return [
            Recall(
                start,
                end,
                decode(self.tokens[start:end]),
                tuple(layer for layer, _ in seen),
                tuple((m.role, m.text) for m in self._messages if m.start < end and start < m.end),
                tuple(rank for _, rank in seen),
            )  # fmt: skip
            for (start, end), seen in sorted(by_span.items())
        ]
