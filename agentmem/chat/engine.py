"""What a chat reply runs on (ChatAgentMem, `agentmem serve`): one loaded model per name per
process, one `Thread` (an agentmem session, the tokens it holds, a lock) per session key, the
match of a re-sent history against what a session already holds (only the new suffix is
prefilled; a history that diverges gets a new branch, a stored one forked where it diverges),
and the generation loop (sampling, stop strings, finish reason)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import agentmem
from agentmem import Sampling, sampling
from agentmem.chat import render
from agentmem.chat.render import Piece

_models: dict[str, agentmem.LanguageModel] = {}
_models_lock = threading.Lock()


def language_model(name: str) -> agentmem.LanguageModel:
    """The model `name` (a built-in name or a path), loaded once per process and shared."""
    with _models_lock:
        lm = _models.get(name)
        if lm is None:
            lm = _models[name] = agentmem.load(name)
        return lm


@dataclass
class Thread:
    """One conversation's memory: its session (None until first used), every token the session
    holds (the one generated last, not yet fed, included), its branch number."""

    key: tuple
    session: agentmem.Session | None = None
    held: list[int] = field(default_factory=list)
    branch: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_threads: dict[tuple, Thread] = {}
_threads_lock = threading.Lock()


def thread(lm_name: str, session_id: str | None, store: Any, tenant: str) -> Thread:
    """The conversation `session_id` (shared by every caller in this process on the same
    model and store), or a fresh one of its own without an id."""
    if session_id is None:
        return Thread(key=(lm_name, None, tenant, None))
    key = (lm_name, store, tenant, session_id)
    with _threads_lock:
        found = _threads.get(key)
        if found is None:
            found = _threads[key] = Thread(key=key)
        return found


def tokens_held() -> int:
    """The tokens every conversation open in this process holds (`agentmem serve`'s metric)."""
    with _threads_lock:
        return sum(len(th.held) for th in _threads.values())


def forget(lm_name: str, session_id: str, store: Any, tenant: str) -> bool:
    """Drop this process's copy of a conversation (waiting for a call on it to end); False if
    there was none. A stored one stays in its store and resumes on its next call."""
    with _threads_lock:
        th = _threads.pop((lm_name, store, tenant, session_id), None)
    if th is None:
        return False
    with th.lock:
        th.session, th.held = None, []
    return True


@dataclass(frozen=True)
class Request:
    pieces: list[Piece]  # the rendered history; the last one is the generation prompt
    forced: str  # text the reply is made to start with (a forced tool call's head)
    max_new_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    memory: agentmem.MemoryConfig | None = None
    # The same messages rendered as new ones that follow a conversation (`render.continuation`):
    # fed after what the session holds when the history does not begin as the session does.
    continuation: list[Piece] | None = None


@dataclass
class Outcome:
    text: str = ""  # the reply, the forced head included
    finish_reason: str = "stop"
    input_tokens: int = 0  # the prompt as the session holds it
    cached_tokens: int = 0  # of which were in memory already (not prefilled)
    output_tokens: int = 0
    session_id: str | None = None
    forked: bool = False
    appended: bool = False  # the messages were new ones, fed after what the session held
    recalled: list[dict] = field(default_factory=list)  # units: span, text, layers, messages
    recalled_messages: list[dict] = field(default_factory=list)  # what `messages` index


def _ids(tokenizer, text: str, at_start: bool) -> list[int]:
    """Token ids of a piece of prompt; only the first of a session gets the tokenizer's own
    special tokens (a BOS), and not when the template wrote it already."""
    bos = getattr(tokenizer, "bos_token", None)
    special = at_start and not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special).input_ids


def _feeds(tokenizer, pieces: list[Piece]) -> list[tuple[str, str, list[int]]]:
    """The history as (role, text, ids) per piece, tokenized as a fresh session would."""
    feeds, at = [], 0
    for piece in pieces:
        ids = _ids(tokenizer, piece.text, at_start=at == 0)
        feeds.append((piece.role, piece.text, ids))
        at += len(ids)
    return feeds


class Run:
    """One call: match and feed the history, then generate. Iterate for the text as it decodes
    (stop strings cut out); `outcome` is complete once iteration ended. The thread's lock is
    held throughout, so concurrent calls on one conversation take turns."""

    def __init__(self, lm: agentmem.LanguageModel, th: Thread, request: Request, *, store: Any,
                 tenant: str, cancel: threading.Event | None = None) -> None:  # fmt: skip
        self.lm, self.th, self.request = lm, th, request
        self.store, self.tenant = store, tenant
        self.cancel = cancel or threading.Event()
        self.outcome = Outcome(session_id=th.key[3])

    # -- the history -----------------------------------------------------------------------------

    def _plan(self, pieces: list[Piece]) -> list[tuple[str | None, str | None, list[int]]] | None:
        """What to feed after what the session holds, as (role, text, ids) (role and text None
        for a piece's tail), or None if the session holds something the history does not."""
        tok, held = self.lm.tokenizer, self.th.held
        feeds = _feeds(tok, pieces)
        flat = [i for _, _, ids in feeds for i in ids]
        if flat[: len(held)] == held and len(held) <= len(flat):
            return _after(feeds, len(held))
        # The model's own tokens may spell the reply another way than the tokenizer would.
        text = tok.decode(held, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        whole = "".join(piece.text for piece in pieces)
        if "\ufffd" in text or not whole.startswith(text):  # a lossy decode proves nothing
            return None
        out, start = [], 0
        for piece in pieces:
            end = start + len(piece.text)
            if end > len(text):
                if start >= len(text):
                    out.append((piece.role, piece.text, _ids(tok, piece.text, at_start=False)))
                else:
                    tail = piece.text[len(text) - start :]
                    out.append((None, None, tok(tail, add_special_tokens=False).input_ids))
            start = end
        return out

    def _open(self, pieces: list[Piece]):
        """The session to continue (resumed, or a branch made) and what to feed it."""
        th = self.th
        if th.session is not None:
            plan = self._appended(pieces) or self._plan(pieces)
            if plan is not None:
                return plan
            self.outcome.forked = True
            return self._branch(th.branch + 1, pieces)
        if self.store is None or th.key[3] is None:
            return self._fresh(pieces, self.lm.session(memory=self.request.memory, progress=False))
        # A stored conversation: its newest branch that agrees with the history, else a new one
        # forked from the branch that agrees longest.
        base, n = th.key[3], 0
        while self.store.session_info(_branch_id(base, n + 1), tenant=self.tenant) is not None:
            n += 1
        flat = [i for _, _, ids in _feeds(self.lm.tokenizer, pieces) for i in ids]
        longest = None  # (common tokens, branch, session, held) of the one that agrees longest
        for k in range(n, -1, -1):
            if self.store.session_info(_branch_id(base, k), tenant=self.tenant) is None:
                continue
            session = self._stored(_branch_id(base, k))
            th.session, th.branch = session, k
            th.held = list(session.tokens) + session.state_dict()["meta"]["session"]["pending"]
            plan = (self._appended(pieces) if k == n else None) or self._plan(pieces)
            if plan is not None:
                self.outcome.session_id = _branch_id(base, k)
                return plan
            common = _common(th.held, flat)
            if longest is None or common > longest[0]:
                longest = (common, k, session, th.held)
        if longest is not None:
            self.outcome.forked = True
            _, th.branch, th.session, th.held = longest
            return self._branch(n + 1, pieces)
        return self._fresh(pieces, self._stored(base))

    def _appended(self, pieces: list[Piece]) -> list | None:
        """With a `continuation`: its feeds, when the history does not begin with the tokens the
        session begins with (its first message differs: it holds only new messages); else None.
        The template's end of the reply the session holds last comes first (what the model did
        not write of it)."""
        continuation, held, tok = self.request.continuation, self.th.held, self.lm.tokenizer
        if continuation is None or not held:
            return None
        first = _ids(tok, pieces[0].text, at_start=True)
        if held[: len(first)] == first:
            return None
        self.outcome.appended = True
        continuation = _with_forced(continuation, self.request.forced)
        end, eos = render.reply_end(tok), tok.eos_token or ""
        if held[-1] in eos_ids(self.lm) and eos and end.startswith(eos):
            end = end[len(eos) :]  # the model wrote its end of turn
        feeds = [(None, None, tok(end, add_special_tokens=False).input_ids)] if end else []
        return feeds + [(p.role, p.text, _ids(tok, p.text, at_start=False)) for p in continuation]

    def _stored(self, session_id: str):
        return self.lm.session(
            session_id, store=self.store, tenant=self.tenant, memory=self.request.memory,
            progress=False, autosave=False,
        )  # fmt: skip

    def _branch(self, n: int, pieces: list[Piece]):
        """A new session for a history that diverged from the one held: with a store, stored as
        `<id>:<n>`, forked from the one held at the first token where they differ (the old one
        kept; the branch holds only the tokens they share, so no answer comes from the other
        past); without, a fresh one in this process only."""
        th = self.th
        if self.store is not None:  # another process may have made branches meanwhile
            while self.store.session_info(_branch_id(th.key[3], n), tenant=self.tenant):
                n += 1
        th.branch = n
        if self.store is None:
            return self._fresh(pieces, self.lm.session(memory=self.request.memory, progress=False))
        session_id = _branch_id(th.key[3], n)
        self.outcome.session_id = session_id
        flat = [i for _, _, ids in _feeds(self.lm.tokenizer, pieces) for i in ids]
        common = _common(th.held, flat)
        th.session, th.held = th.session.fork(session_id, at=common), th.held[:common]
        return self._plan(pieces)  # what follows the shared tokens

    def _fresh(self, pieces: list[Piece], session):
        self.th.session, self.th.held = session, []
        return self._plan(pieces)

    def _feed(self, plan) -> Iterator[None]:
        """Feed the plan, pausing after each prefill chunk (`Session.append_tokens_stepwise`)."""
        session, tok = self.th.session, self.lm.tokenizer
        for role, text, ids in plan:
            if not ids:
                continue
            own = None if text is None else tok(text, add_special_tokens=len(session) == 0)
            start = len(session)
            yield from session.append_tokens_stepwise(ids)
            self.th.held.extend(ids)
            if own is not None and ids == own.input_ids:
                session.record(role, text, start)  # a message as `append` records it (provenance)

    # -- generation ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        with self.th.lock:
            yield from self._run()

    def _run(self) -> Iterator[str]:
        request, outcome, th = self.request, self.outcome, self.th
        plan = self._open(_with_forced(request.pieces, request.forced))
        if self.store is not None and th.key[3] is not None:  # the stored branch it continues
            outcome.session_id = _branch_id(th.key[3], th.branch)
        outcome.cached_tokens = len(th.held)
        outcome.text = request.forced
        tokens = None
        try:
            for _ in self._feed(plan):
                yield ""  # a pause between prefill chunks: no text
            outcome.input_tokens = len(th.held)
            start = len(th.session)
            tokens = th.session.generate_tokens(request.max_new_tokens)
            yield from self._decode(tokens)
        finally:
            if tokens is not None:
                tokens.close()
                reply = outcome.text[len(request.forced) :]  # the head was fed with the prompt
                if len(th.session) > start and reply:  # the reply, as a message of its own
                    # as text a store keeps (a random model may write a NUL byte)
                    th.session.record("assistant", reply.replace("\x00", "\ufffd"), start)
            self._settle()

    def _decode(self, tokens: Iterator[int]) -> Iterator[str]:
        request, outcome, th, tok = self.request, self.outcome, self.th, self.lm.tokenizer
        eos = eos_ids(self.lm)
        produced: list[int] = []
        text, shown = "", 0  # the reply's text (forced head excluded) and how much was yielded
        outcome.finish_reason = "length"
        with sampling(request.sampling):  # read by the first step: the continuation keeps it
            first = next(tokens, None)
        for token_id in itertools.chain([] if first is None else [first], tokens):
            th.held.append(token_id)
            outcome.output_tokens += 1
            if token_id in eos:
                outcome.finish_reason = "stop"
                break
            produced.append(token_id)
            text = tok.decode(produced, skip_special_tokens=True)
            outcome.text = request.forced + text.removesuffix("\ufffd")
            if text.endswith("\ufffd"):  # an incomplete character: wait for the rest
                continue
            cut = _stop_at(text, request.stop)
            if cut is not None:
                text, outcome.finish_reason = text[:cut], "stop"
                outcome.text = request.forced + text
                break
            safe = len(text) - _stop_tail(text, request.stop)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
            if self.cancel.is_set():
                outcome.finish_reason = "cancelled"
                break
        text = text.removesuffix("\ufffd")
        if len(text) > shown:
            yield text[shown:]

    def _settle(self) -> None:
        """After a call (also one that failed or was abandoned): check the bookkeeping, save a
        stored session, note what the last step recalled."""
        th, session = self.th, self.th.session
        if session is None:
            return
        if len(session) != len(th.held):  # never reuse a memory whose tokens are not known
            counted = len(th.held)
            th.session, th.held = None, []
            raise RuntimeError(
                f"the agentmem session holds {len(session)} tokens, the conversation counted "
                f"{counted}: the conversation starts afresh next call"
            )
        if self.store is not None and hasattr(session, "save"):
            session.save()
        messages: dict[tuple[str, str], int] = {}  # each recalled message listed once
        for r in session.recalled():
            ids = [messages.setdefault(m, len(messages)) for m in r.messages]
            self.outcome.recalled.append(
                {"start": r.start, "end": r.end, "text": r.text, "layers": list(r.layers),
                 "messages": ids}
            )  # fmt: skip
        self.outcome.recalled_messages = [{"role": role, "text": t} for role, t in messages]


def _with_forced(pieces: list[Piece], forced: str) -> list[Piece]:
    """The pieces with the reply's forced head after the generation prompt (the last piece)."""
    if not forced:
        return list(pieces)
    return [*pieces[:-1], Piece(pieces[-1].role, pieces[-1].text + forced)]


def _after(feeds, n: int):
    """`feeds` past the first `n` tokens (a piece cut there keeps only its tail's ids)."""
    out, at = [], 0
    for role, text, ids in feeds:
        if at + len(ids) <= n:
            at += len(ids)
            continue
        if at < n:
            out.append((None, None, ids[n - at :]))
        else:
            out.append((role, text, ids))
        at += len(ids)
    return out


def _common(held: list[int], ids: list[int]) -> int:
    """How many first tokens `held` and `ids` share."""
    n = 0
    for a, b in zip(held, ids, strict=False):  # the shorter one ends it
        if a != b:
            break
        n += 1
    return n


def _branch_id(base: str, n: int) -> str:
    return base if n == 0 else f"{base}:{n}"


def eos_ids(lm: agentmem.LanguageModel) -> set[int]:
    """The ids that end a reply (the model's generation config, else its tokenizer's)."""
    eos = lm.model.generation_config.eos_token_id
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()


def _stop_at(text: str, stop: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stop if s and s in text]
    return min(found) if found else None


def _stop_tail(text: str, stop: tuple[str, ...]) -> int:
    """How many last characters of `text` could begin a stop string (held back)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
