"""Sessions and messages: create, look up, list per tenant, fork, delete, reopen; literal text;
tenant isolation; ids validated where they enter."""

from __future__ import annotations

from datetime import timezone

import pytest

from agentmem.persistence import InvalidId, SessionExists, SessionNotFound

FP = {"model": "tiny-llama", "layers": 2, "dtype": "bfloat16"}
MEM = {"unit": 128, "topk": 4}


def test_create_info_and_list_own_tenant_only(store):
    made = store.create_session("s1", fingerprint=FP, memory=MEM, tenant="acme")
    store.create_session("s2", fingerprint={}, memory={}, tenant="acme")
    store.create_session("s3", fingerprint={}, memory={}, tenant="other")
    assert made.id == "s1" and made.tenant == "acme" and made.tokens == 0 and made.parent is None
    assert made.fingerprint == FP and made.memory == MEM
    assert made.created.tzinfo is not None and made.created == made.updated
    assert store.session_info("s1", tenant="acme") == made
    assert store.session_info("nope", tenant="acme") is None
    assert [s.id for s in store.sessions(tenant="acme")] == ["s1", "s2"]
    assert [s.id for s in store.sessions(tenant="other")] == ["s3"]
    assert store.sessions(tenant="nobody") == []


def test_create_twice_raises_session_exists(store):
    store.create_session("s1", fingerprint=FP, memory=MEM, tenant="acme")
    with pytest.raises(SessionExists, match="'s1'"):
        store.create_session("s1", fingerprint={}, memory={}, tenant="acme")
    store.create_session("s1", fingerprint={}, memory={}, tenant="other")  # ids are per tenant
    assert store.session_info("s1", tenant="acme").fingerprint == FP


TEXTS = [
    "'; DROP TABLE sessions; --",
    "she said \"hi\" and 'bye' \\ backslash %s %(x)s ? :name $1",
    "emoji 🧠🔥 and CJK 記憶 and RTL שלום, combining é",
    "line\nbreaks\r\n\ttabs " + "x" * 10_000,
    "",
]


def test_messages_round_trip_literal_text_in_order(store, open_store):
    store.create_session("s1", fingerprint=FP, memory=MEM, tenant="acme")
    for i, text in enumerate(TEXTS):
        added = store.add_message(
            "s1", "user" if i % 2 else "assistant", text, i, i + 1, tenant="acme"
        )
        assert added.text == text
    got = store.messages("s1", tenant="acme")
    assert [m.text for m in got] == TEXTS
    assert [(m.start, m.end) for m in got] == [(i, i + 1) for i in range(len(TEXTS))]
    assert got[0].role == "assistant" and got[1].role == "user"
    assert store.sessions(tenant="acme")[0].id == "s1"  # the table survived
    assert [m.text for m in open_store().messages("s1", tenant="acme")] == TEXTS


def test_message_input_checked(store):
    store.create_session("s1", fingerprint=FP, memory=MEM, tenant="acme")
    with pytest.raises(ValueError, match="NUL"):
        store.add_message("s1", "user", "a\0b", 0, 1, tenant="acme")
    with pytest.raises(ValueError, match="end"):
        store.add_message("s1", "user", "x", 5, 2, tenant="acme")
    with pytest.raises(ValueError, match="role"):
        store.add_message("s1", "", "x", 0, 1, tenant="acme")
    assert store.messages("s1", tenant="acme") == []


def test_fork_copies_messages_and_diverges(store):
    store.create_session("p", fingerprint=FP, memory=MEM, tenant="acme")
    store.add_message("p", "user", "one", 0, 3, tenant="acme")
    child = store.fork("p", "c", tenant="acme")
    assert child.parent == "p" and child.fingerprint == FP and child.memory == MEM
    store.add_message("p", "user", "parent only", 3, 5, tenant="acme")
    store.add_message("c", "user", "child only", 3, 6, tenant="acme")
    assert [m.text for m in store.messages("p", tenant="acme")] == ["one", "parent only"]
    assert [m.text for m in store.messages("c", tenant="acme")] == ["one", "child only"]
    with pytest.raises(SessionExists):
        store.fork("p", "c", tenant="acme")
    with pytest.raises(SessionNotFound):
        store.fork("missing", "c2", tenant="acme")


def test_delete_removes_session_and_messages(store):
    store.create_session("s1", fingerprint=FP, memory=MEM, tenant="acme")
    store.add_message("s1", "user", "hello", 0, 5, tenant="acme")
    store.delete("s1", tenant="acme")
    assert store.session_info("s1", tenant="acme") is None
    with pytest.raises(SessionNotFound):
        store.messages("s1", tenant="acme")
    with pytest.raises(SessionNotFound):
        store.delete("s1", tenant="acme")
    store.create_session("s1", fingerprint={}, memory={}, tenant="acme")  # the id is free again
    assert store.messages("s1", tenant="acme") == []


def test_reopen_sees_everything(store, open_store):
    store.create_session("s1", fingerprint=FP, memory=MEM, tenant="acme")
    store.add_message("s1", "user", "kept", 0, 4, tenant="acme")
    store.fork("s1", "s2", tenant="acme")
    before = store.sessions(tenant="acme")
    store.close()
    again = open_store()
    assert again.sessions(tenant="acme") == before
    assert [m.text for m in again.messages("s2", tenant="acme")] == ["kept"]
    assert before[0].created.tzinfo == timezone.utc


def test_tenant_isolation(store):
    import torch

    store.create_session("secret", fingerprint=FP, memory=MEM, tenant="alice")
    store.add_message("secret", "user", "alice's text", 0, 1, tenant="alice")
    store.write_segment("secret", {"k": torch.ones(2)}, {}, tokens=1, tenant="alice")
    calls = {
        "messages": lambda: store.messages("secret", tenant="bob"),
        "segments": lambda: store.segments("secret", tenant="bob"),
        "fork": lambda: store.fork("secret", "stolen", tenant="bob"),
        "delete": lambda: store.delete("secret", tenant="bob"),
        "add_message": lambda: store.add_message("secret", "user", "x", 0, 1, tenant="bob"),
        "write_segment": lambda: store.write_segment(
            "secret", {"k": torch.ones(1)}, {}, 1, tenant="bob"
        ),
    }
    for name, call in calls.items():
        with pytest.raises(SessionNotFound) as caught:
            call()
        assert "alice" not in str(caught.value), name  # never says who has it
    assert store.session_info("secret", tenant="bob") is None
    assert store.sessions(tenant="bob") == []
    # Nothing of alice's changed, and bob got no session.
    assert [m.text for m in store.messages("secret", tenant="alice")] == ["alice's text"]
    assert len(store.segments("secret", tenant="alice")) == 1
    assert store.session_info("stolen", tenant="bob") is None
    assert len(list((store.root / "payloads").glob("*.safetensors"))) == 1


BAD_IDS = ["../x", "a\0b", "x" * 200, "café", "", ".hidden", "a/b", "a b", "x\n", "ｘ", 7, None]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_invalid_ids_raise_where_they_enter(store, bad):
    store.create_session("ok", fingerprint={}, memory={}, tenant="acme")
    calls = [
        lambda: store.create_session(bad, fingerprint={}, memory={}, tenant="acme"),
        lambda: store.create_session("s", fingerprint={}, memory={}, tenant=bad),
        lambda: store.session_info(bad, tenant="acme"),
        lambda: store.sessions(tenant=bad),
        lambda: store.fork("ok", bad, tenant="acme"),
        lambda: store.messages("ok", tenant=bad),
        lambda: store.delete(bad, tenant="acme"),
    ]
    for call in calls:
        with pytest.raises(InvalidId, match="letters, digits") as caught:
            call()
        assert isinstance(caught.value, ValueError)
    assert [s.id for s in store.sessions(tenant="acme")] == ["ok"]


def test_valid_ids_accepted(store):
    ids = ["a", "x" * 128, "user@example.com", "org:team-1_v2.3", "0", "-"]
    for sid in ids:
        store.create_session(sid, fingerprint={}, memory={}, tenant="t.e-n:a@n_t")
    assert sorted(s.id for s in store.sessions(tenant="t.e-n:a@n_t")) == sorted(ids)


def test_concurrent_writers_get_distinct_sequence_numbers(store, open_store):
    from concurrent.futures import ThreadPoolExecutor

    store.create_session("s1", fingerprint={}, memory={}, tenant="acme")
    stores = [store, open_store()]  # two stores: two pools, as two processes would have

    def append(worker: int) -> None:
        for i in range(10):
            stores[worker % 2].add_message("s1", "user", f"{worker}:{i}", 0, 1, tenant="acme")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(append, range(4)))
    texts = [m.text for m in store.messages("s1", tenant="acme")]
    assert sorted(texts) == sorted(f"{w}:{i}" for w in range(4) for i in range(10))
    for w in range(4):  # each writer's messages kept its own order
        assert [t for t in texts if t.startswith(f"{w}:")] == [f"{w}:{i}" for i in range(10)]
