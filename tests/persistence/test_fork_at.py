"""A stored session forked at a token (`PersistentSession.fork(new_id, at=n)`), on SQLite and
PostgreSQL: the copy holds exactly the first n tokens, shares the payloads of the newest save at
or before n, is fed the rest from there, keeps only the messages before n, continues as a
session fed the same tokens would, and leaves its parent as it was."""

from __future__ import annotations

import pytest
import torch

import agentmem
from agentmem.session import LanguageModel
from tests.helpers import build, char_tokenizer

SMALL = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=48, exec_chunk=16)
# A window that covers these sessions: retrieval does not depend on how tokens were stepped.
COVERING = agentmem.MemoryConfig(n_init=4, unit_size=16, topk=2, n_local=512, exec_chunk=64)
FACT = "The code is 4721. "
FILLER = "The quick brown fox jumps over the lazy dog. " * 5
ASK = FILLER + "What is the code?"
PROBE = " And the code?"


@pytest.fixture
def lm() -> LanguageModel:
    return LanguageModel(build("gemma3"), char_tokenizer(), SMALL)  # memory and sliding layers


def _conversation(session, turns: int = 3) -> list[int]:
    """Up to three turns, each saved (autosave); returns the session's length after each."""
    lengths = []
    for turn in range(turns):
        if turn == 1:
            session.generate(max_new_tokens=4)  # its last token is left pending
        else:
            session.append(FACT + FILLER if turn == 0 else ASK, role="user")
        lengths.append(len(session))
    return lengths


def _all(session) -> list[int]:
    """Every token the session holds, as `len` counts them (a pending one last)."""
    return session.tokens + session.state_dict()["meta"]["session"]["pending"]


def _next(session) -> tuple[torch.Tensor, list[int]]:
    """What the session does next: one step on a question (a pending token fed with it), its
    logits (the random Gemma's greedy tokens repeat one id: the logits say more), then greedy."""
    session.append_tokens(session.lm.tokenizer(PROBE, add_special_tokens=False).input_ids)
    logits = session.state_dict()["tensors"]["session.next_logits"].clone()
    return logits, list(session.generate_tokens(max_new_tokens=10))


def _same(got, want, exact: bool = True) -> None:
    if exact:
        assert torch.equal(got[0], want[0])
    else:
        torch.testing.assert_close(got[0], want[0])
    assert got[1] == want[1]


def _files(store, session_id: str) -> list[str]:
    return [s.file for s in store.segments(session_id, tenant="default")]


def test_a_fork_at_a_save_shares_its_segments_and_feeds_nothing(lm, store):
    parent = lm.session("p", store=store)
    first, second, _ = _conversation(parent)
    child = parent.fork("c", at=first)
    assert _files(store, "c") == _files(store, "p")[:1]  # no save of its own
    assert child.tokens == parent.tokens[:first] and len(child) == first
    assert store.session_info("c", tenant="default").tokens == first
    reference = lm.session()
    _conversation(reference, turns=1)
    _same(_next(child), _next(reference))
    # At the save after a generation, its pending token is the copy's too.
    pending = parent.fork("g", at=second)
    assert _all(pending) == _all(parent)[:second] and len(pending.tokens) == second - 1
    reference = lm.session()
    _conversation(reference, turns=2)
    _same(_next(pending), _next(reference))


def test_a_fork_inside_a_segment_is_fed_the_rest_from_the_save_before(lm, store, open_store):
    parent = lm.session("p", store=store)
    _, second, third = _conversation(parent)
    at = second + 30  # inside the last turn: the generated reply's pending token, then 29 more
    child = parent.fork("c", at=at)
    assert len(child) == at and child.tokens == _all(parent)[:at]  # nothing left pending
    files = _files(store, "c")
    assert files[:2] == _files(store, "p")[:2] and len(files) == 3  # two shared, one its own
    # It continues as a session fed the same tokens in the same steps: the first two turns,
    # then the rest in one step (other steps would retrieve other units on the way).
    reference = lm.session()
    _conversation(reference, turns=2)
    reference.append_tokens(_all(parent)[second:at])
    want = _next(reference)
    resumed = lm.session("c", store=open_store())  # what it saved is the copy, whole
    _same(_next(child), want)
    _same(_next(resumed), want)
    assert third > at  # the parent went further


def test_a_fork_continues_as_a_session_fed_the_same_tokens_at_once(store):
    lm = LanguageModel(build("qwen3"), char_tokenizer(), COVERING)  # its greedy tokens vary
    parent = lm.session("p", store=store)
    _, second, _ = _conversation(parent)
    for at in (second, second + 7):  # at a save (a pending token) and between two
        child = parent.fork(f"c{at}", at=at)
        fresh = lm.session()
        fresh.append_tokens(_all(parent)[:at])
        _same(_next(child), _next(fresh), exact=False)  # other steps: other rounding


def test_a_fork_at_zero_is_empty_and_at_len_is_whole(lm, store):
    parent = lm.session("p", store=store)
    _conversation(parent)
    empty = parent.fork("zero", at=0)
    assert len(empty) == 0 and empty.messages() == [] and _files(store, "zero") == []
    assert store.session_info("zero", tenant="default").tokens == 0
    empty.append(FACT)
    fresh = lm.session()
    fresh.append(FACT)
    _same(_next(empty), _next(fresh))
    whole = parent.fork("whole", at=len(parent))
    assert _files(store, "whole") == _files(store, "p")
    assert _all(whole) == _all(parent)
    assert [(m.role, m.start, m.end) for m in whole.messages()] == [
        (m.role, m.start, m.end) for m in parent.messages()
    ]


@pytest.mark.parametrize("at", [-1, "last+1", 2.0, True, "3"])
def test_a_fork_point_outside_the_session_is_refused(lm, store, at):
    parent = lm.session("p", store=store)
    parent.append(FACT)
    at = len(parent) + 1 if at == "last+1" else at
    with pytest.raises(ValueError, match=r"at= must be an int in \[0, 19\]"):
        parent.fork("c", at=at)
    assert store.session_info("c", tenant="default") is None


def test_the_parent_is_unchanged_by_a_fork(lm, store, open_store):
    parent = lm.session("p", store=store)
    _, second, _ = _conversation(parent)
    tokens, files, messages = _all(parent), _files(store, "p"), parent.messages()
    parent.fork("c", at=second + 5).append("Only the child hears this.")
    assert _all(parent) == tokens and parent.messages() == messages
    assert _files(store, "p") == files
    assert [m.text for m in store.messages("p", tenant="default")] == [m.text for m in messages]
    uninterrupted = lm.session()
    _conversation(uninterrupted)
    want = _next(uninterrupted)
    _same(_next(parent), want)
    _same(_next(lm.session("p", store=open_store())), want)


def test_a_fork_keeps_only_the_messages_before_its_point(lm, store, open_store):
    parent = lm.session("p", store=store, autosave=False)
    parent.append(FACT, role="system")
    parent.append(FILLER, role="user")  # both in one save: a fork at FACT's end re-feeds FACT
    parent.save()
    parent.append(ASK, role="user")
    end_fact = parent.messages()[0].end
    child = parent.fork("c", at=end_fact)
    assert _files(store, "c") != [] and _files(store, "c")[0] not in _files(store, "p")
    assert [(m.role, m.text) for m in child.messages()] == [("system", FACT)]
    stored = open_store().messages("c", tenant="default")
    assert [(m.role, m.text, m.start, m.end) for m in stored] == [("system", FACT, 0, end_fact)]
    # A message the fork point cuts is left out, whole; those before it are kept.
    cut = parent.fork("cut", at=parent.messages()[2].start + 3)
    assert [m.role for m in cut.messages()] == ["system", "user"]
    assert len(cut) == parent.messages()[2].start + 3


def test_the_store_forks_a_prefix_of_segments_and_messages(store):
    store.create_session("p", fingerprint={}, memory={})
    for end in (3, 7):
        store.write_segment("p", {}, {}, tokens=end, messages=[("user", f"to {end}", 0, end)])
    info = store.fork("p", "c", segments=1, tokens=3)
    assert info.tokens == 3 and info.parent == "p"
    assert [s.file for s in store.segments("c")] == [s.file for s in store.segments("p")][:1]
    assert [m.text for m in store.messages("c")] == ["to 3"]
    with pytest.raises(ValueError, match="together"):
        store.fork("p", "d", segments=1)
    with pytest.raises(ValueError, match="2 segments and 7 tokens"):
        store.fork("p", "d", segments=3, tokens=7)
    with pytest.raises(ValueError, match="2 segments and 7 tokens"):
        store.fork("p", "d", segments=2, tokens=8)
    assert store.session_info("d") is None
