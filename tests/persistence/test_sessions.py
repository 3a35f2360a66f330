"""Sessions and messages: create, look up, list per tenant, fork, delete, reopen; literal text;
tenant isolation; ids validated where they enter."""

from __future__ import annotations

from datetime import timezone

import pytest

from agentmem.persistence import InvalidId, SessionExists, SessionNotFound

FP = {"model": "tiny-llama", "layers": 2, "dtype": "bfloat16"}
MEM = {"unit": 128, "topk": 4}


def test_create_info_and_list_own_tenant_only(store):
    made = store.create_session("acme", "s1", fingerprint=FP, memory=MEM)
    store.create_session("acme", "s2", fingerprint={}, memory={})
    store.create_session("other", "s3", fingerprint={}, memory={})
    assert made.id == "s1" and made.tenant == "acme" and made.tokens == 0 and made.parent is None
    assert made.fingerprint == FP and made.memory == MEM
    assert made.created.tzinfo is not None and made.created == made.updated
    assert store.session_info("acme", "s1") == made
    assert store.session_info("acme", "nope") is None
    assert [s.id for s in store.sessions("acme")] == ["s1", "s2"]
    assert [s.id for s in store.sessions("other")] == ["s3"]
    assert store.sessions("nobody") == []


def test_create_twice_raises_session_exists(store):
    store.create_session("acme", "s1", fingerprint=FP, memory=MEM)
    with pytest.raises(SessionExists, match="'s1'"):
        store.create_session("acme", "s1", fingerprint={}, memory={})
    store.create_session("other", "s1", fingerprint={}, memory={})  # ids are per tenant
    assert store.session_info("acme", "s1").fingerprint == FP


TEXTS = [
    "'; DROP TABLE sessions; --",
    "she said \"hi\" and 'bye' \\ backslash %s %(x)s ? :name $1",
    "emoji 🧠🔥 and CJK 記憶 and RTL שלום, combining é",
    "line\nbreaks\r\n\ttabs " + "x" * 10_000,
    "",
]


def test_messages_round_trip_literal_text_in_order(store, open_store):
    store.create_session("acme", "s1", fingerprint=FP, memory=MEM)
    for i, text in enumerate(TEXTS):
        added = store.add_message("acme", "s1", "user" if i % 2 else "assistant", text, i, i + 1)
        assert added.text == text
    got = store.messages("acme", "s1")
    assert [m.text for m in got] == TEXTS
    assert [(m.start, m.end) for m in got] == [(i, i + 1) for i in range(len(TEXTS))]
    assert got[0].role == "assistant" and got[1].role == "user"
    assert store.sessions("acme")[0].id == "s1"  # the table survived
    assert [m.text for m in open_store().messages("acme", "s1")] == TEXTS


def test_message_input_checked(store):
    store.create_session("acme", "s1", fingerprint=FP, memory=MEM)
    with pytest.raises(ValueError, match="NUL"):
        store.add_message("acme", "s1", "user", "a\0b", 0, 1)
    with pytest.raises(ValueError, match="end"):
        store.add_message("acme", "s1", "user", "x", 5, 2)
    with pytest.raises(ValueError, match="role"):
        store.add_message("acme", "s1", "", "x", 0, 1)
    assert store.messages("acme", "s1") == []


def test_fork_copies_messages_and_diverges(store):
    store.create_session("acme", "p", fingerprint=FP, memory=MEM)
    store.add_message("acme", "p", "user", "one", 0, 3)
    child = store.fork("acme", "p", "c")
    assert child.parent == "p" and child.fingerprint == FP and child.memory == MEM
    store.add_message("acme", "p", "user", "parent only", 3, 5)
    store.add_message("acme", "c", "user", "child only", 3, 6)
    assert [m.text for m in store.messages("acme", "p")] == ["one", "parent only"]
    assert [m.text for m in store.messages("acme", "c")] == ["one", "child only"]
    with pytest.raises(SessionExists):
        store.fork("acme", "p", "c")
    with pytest.raises(SessionNotFound):
        store.fork("acme", "missing", "c2")


def test_delete_removes_session_and_messages(store):
    store.create_session("acme", "s1", fingerprint=FP, memory=MEM)
    store.add_message("acme", "s1", "user", "hello", 0, 5)
    store.delete("acme", "s1")
    assert store.session_info("acme", "s1") is None
    with pytest.raises(SessionNotFound):
        store.messages("acme", "s1")
    with pytest.raises(SessionNotFound):
        store.delete("acme", "s1")
    store.create_session("acme", "s1", fingerprint={}, memory={})  # the id is free again
    assert store.messages("acme", "s1") == []


def test_reopen_sees_everything(store, open_store):
    store.create_session("acme", "s1", fingerprint=FP, memory=MEM)
    store.add_message("acme", "s1", "user", "kept", 0, 4)
    store.fork("acme", "s1", "s2")
    before = store.sessions("acme")
    store.close()
    again = open_store()
    assert again.sessions("acme") == before
    assert [m.text for m in again.messages("acme", "s2")] == ["kept"]
    assert before[0].created.tzinfo == timezone.utc


def test_tenant_isolation(store):
    import torch

    store.create_session("alice", "secret", fingerprint=FP, memory=MEM)
    store.add_message("alice", "secret", "user", "alice's text", 0, 1)
    store.write_segment("alice", "secret", {"k": torch.ones(2)}, {}, tokens=1)
    calls = {
        "messages": lambda: store.messages("bob", "secret"),
        "segments": lambda: store.segments("bob", "secret"),
        "fork": lambda: store.fork("bob", "secret", "stolen"),
        "delete": lambda: store.delete("bob", "secret"),
        "add_message": lambda: store.add_message("bob", "secret", "user", "x", 0, 1),
        "write_segment": lambda: store.write_segment("bob", "secret", {"k": torch.ones(1)}, {}, 1),
    }
    for name, call in calls.items():
        with pytest.raises(SessionNotFound) as caught:
            call()
        assert "alice" not in str(caught.value), name  # never says who has it
    assert store.session_info("bob", "secret") is None
    assert store.sessions("bob") == []
    # Nothing of alice's changed, and bob got no session.
    assert [m.text for m in store.messages("alice", "secret")] == ["alice's text"]
    assert len(store.segments("alice", "secret")) == 1
    assert store.session_info("bob", "stolen") is None
    assert len(list((store.root / "payloads").glob("*.safetensors"))) == 1


BAD_IDS = ["../x", "a\0b", "x" * 200, "café", "", ".hidden", "a/b", "a b", "x\n", "ｘ", 7, None]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_invalid_ids_raise_where_they_enter(store, bad):
    store.create_session("acme", "ok", fingerprint={}, memory={})
    calls = [
        lambda: store.create_session("acme", bad, fingerprint={}, memory={}),
        lambda: store.create_session(bad, "s", fingerprint={}, memory={}),
        lambda: store.session_info("acme", bad),
        lambda: store.sessions(bad),
        lambda: store.fork("acme", "ok", bad),
        lambda: store.messages(bad, "ok"),
        lambda: store.delete("acme", bad),
    ]
    for call in calls:
        with pytest.raises(InvalidId, match="letters, digits") as caught:
            call()
        assert isinstance(caught.value, ValueError)
    assert [s.id for s in store.sessions("acme")] == ["ok"]


def test_valid_ids_accepted(store):
    ids = ["a", "x" * 128, "user@example.com", "org:team-1_v2.3", "0", "-"]
    for sid in ids:
        store.create_session("t.e-n:a@n_t", sid, fingerprint={}, memory={})
    assert sorted(s.id for s in store.sessions("t.e-n:a@n_t")) == sorted(ids)


def test_concurrent_writers_get_distinct_sequence_numbers(store, open_store):
    from concurrent.futures import ThreadPoolExecutor

    store.create_session("acme", "s1", fingerprint={}, memory={})
    stores = [store, open_store()]  # two stores: two pools, as two processes would have

    def append(worker: int) -> None:
        for i in range(10):
            stores[worker % 2].add_message("acme", "s1", "user", f"{worker}:{i}", 0, 1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(append, range(4)))
    texts = [m.text for m in store.messages("acme", "s1")]
    assert sorted(texts) == sorted(f"{w}:{i}" for w in range(4) for i in range(10))
    for w in range(4):  # each writer's messages kept its own order
        assert [t for t in texts if t.startswith(f"{w}:")] == [f"{w}:{i}" for i in range(10)]
