"""The sessions API (list, get, delete, fork, export, search), /health, /metrics, API keys and
tenant isolation of `agentmem serve`, over plain HTTP (httpx)."""

from __future__ import annotations

import httpx
import pytest

from agentmem.persistence import Store

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
QUESTION = "What is the weather in Paris?"


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        yield client


def chat(http, live_server, headers, session_id=None, content=QUESTION, max_tokens=4) -> dict:
    body = {
        "model": live_server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if session_id is not None:
        body["session_id"] = session_id
    r = http.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def assert_not_found(r: httpx.Response) -> None:
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["type"] == "not_found_error"
    assert error["code"] == "session_not_found"


# -- the sessions of one tenant ----------------------------------------------------------------


def test_a_chat_with_a_session_id_is_listed_and_its_messages_read(http, live_server):
    """After a chat, the session is in the list, with its tokens and its user message."""
    reply = chat(http, live_server, ALICE, "s-1")
    listed = http.get("/v1/sessions", headers=ALICE).json()
    assert listed["object"] == "list"
    assert [s["id"] for s in listed["data"]] == ["s-1"]
    info = listed["data"][0]
    assert info["object"] == "session" and info["parent"] is None
    held = reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    assert info["tokens"] in (held - 1, held)  # the last token generated may not be fed yet
    got = http.get("/v1/sessions/s-1", headers=ALICE).json()
    assert got["id"] == "s-1" and got["tokens"] == info["tokens"]
    users = [m for m in got["messages"] if m["role"] == "user"]
    assert len(users) == 1 and QUESTION in users[0]["text"]
    assert all(0 <= m["start"] < m["end"] <= got["tokens"] for m in got["messages"])


def test_a_chat_without_a_session_id_stores_nothing(http, live_server):
    chat(http, live_server, ALICE)
    assert http.get("/v1/sessions", headers=ALICE).json()["data"] == []


def test_delete_removes_a_session(http, live_server):
    chat(http, live_server, ALICE, "s-del")
    r = http.delete("/v1/sessions/s-del", headers=ALICE)
    assert r.status_code == 200
    assert r.json() == {"id": "s-del", "object": "session.deleted", "deleted": True}
    assert_not_found(http.get("/v1/sessions/s-del", headers=ALICE))
    assert http.get("/v1/sessions", headers=ALICE).json()["data"] == []
    assert_not_found(http.delete("/v1/sessions/s-del", headers=ALICE))
    # Its id is free again: a new chat on it starts afresh.
    again = chat(http, live_server, ALICE, "s-del")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_fork_copies_a_session_under_a_new_id(http, live_server):
    """A fork has the original's messages and tokens and names it as its parent; forking onto
    an id in use is a 409."""
    chat(http, live_server, ALICE, "s-orig")
    r = http.post("/v1/sessions/s-orig/fork", json={"new_id": "s-copy"}, headers=ALICE)
    assert r.status_code == 200, r.text
    fork = r.json()
    assert fork["id"] == "s-copy" and fork["parent"] == "s-orig"
    orig = http.get("/v1/sessions/s-orig", headers=ALICE).json()
    copy = http.get("/v1/sessions/s-copy", headers=ALICE).json()
    assert copy["tokens"] == orig["tokens"]
    assert copy["messages"] == orig["messages"]
    assert {s["id"] for s in http.get("/v1/sessions", headers=ALICE).json()["data"]} == {
        "s-orig",
        "s-copy",
    }
    again = http.post("/v1/sessions/s-orig/fork", json={"new_id": "s-copy"}, headers=ALICE)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "session_exists"
    assert_not_found(http.post("/v1/sessions/nothing/fork", json={"new_id": "s-x"}, headers=ALICE))


def test_export_gives_a_tar_another_store_imports(http, live_server, tmp_path):
    """The export is a session bundle (tar) that `Store.import_` reads into another store."""
    chat(http, live_server, ALICE, "s-exp")
    r = http.get("/v1/sessions/s-exp/export", headers=ALICE)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar"
    assert "s-exp.tar" in r.headers["content-disposition"]
    bundle = tmp_path / "s-exp.tar"
    bundle.write_bytes(r.content)
    original = http.get("/v1/sessions/s-exp", headers=ALICE).json()
    other = Store(root=tmp_path / "other")
    try:
        info = other.import_(bundle, tenant="carol")
        assert info.id == "s-exp" and info.tokens == original["tokens"]
        messages = other.messages("s-exp", tenant="carol")
        assert [(m.role, m.text) for m in messages] == [
            (m["role"], m["text"]) for m in original["messages"]
        ]
    finally:
        other.close()
    assert_not_found(http.get("/v1/sessions/nothing/export", headers=ALICE))


def test_search_finds_the_session_that_holds_the_words(http, live_server):
    chat(http, live_server, ALICE, "s-weather", content="the weather in Paris is sunny")
    chat(http, live_server, ALICE, "s-fox", content="the quick brown fox jumps")
    r = http.post("/v1/sessions/search", json={"query": "quick brown fox", "k": 3}, headers=ALICE)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert hits and hits[0]["session_id"] == "s-fox"
    assert "fox" in hits[0]["text"]
    assert {"session_id", "role", "text", "start", "end", "score"} <= set(hits[0])
    assert len(hits) <= 3


# -- health and metrics ------------------------------------------------------------------------


def test_health_says_ok_and_names_the_model(http, live_server):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": live_server.model, "waiting": 0, "running": 0}


def test_metrics_count_requests_tokens_and_latencies(http, live_server):
    """After one chat completion, the Prometheus text counts it."""
    reply = chat(http, live_server, ALICE, max_tokens=3)
    text = http.get("/metrics").text
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(lines['agentmem_requests_total{path="/v1/chat/completions",status="200"}']) == 1
    assert float(lines["agentmem_time_to_first_token_seconds_count"]) == 1
    assert float(lines["agentmem_request_seconds_count"]) == 1
    assert float(lines['agentmem_tokens_total{kind="completion"}']) == 3
    assert float(lines['agentmem_tokens_total{kind="prompt"}']) == reply["usage"]["prompt_tokens"]
    assert float(lines['agentmem_tokens_total{kind="cached"}']) == 0
    assert float(lines["agentmem_decode_step_seconds_count"]) >= 2
    for gauge in ("agentmem_queue_depth", "agentmem_active_replies", "agentmem_memory_tokens"):
        assert float(lines[gauge]) >= 0


# -- API keys and tenants ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-alice-x"}]
)
def test_a_missing_or_wrong_key_is_a_401_in_openai_shape(http, live_server, headers):
    chat_body = {"model": live_server.model, "messages": [{"role": "user", "content": "hi"}]}
    for method, path, body in [
        ("POST", "/v1/chat/completions", chat_body),
        ("GET", "/v1/models", None),
        ("GET", "/v1/sessions", None),
    ]:
        r = http.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key"
        assert "API key" in error["message"]


def test_the_key_is_checked_before_the_body(http, live_server):
    """Without a valid key even a bad body is a 401: nothing is told about the request."""
    body = {"model": live_server.model, "messages": []}
    r = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_another_tenant_never_sees_a_session(http, live_server):
    """Bob's key: alice's session is absent from his list and search, and a 404 for get, fork,
    export and delete; alice's session is untouched."""
    chat(http, live_server, ALICE, "alice-1", content="the quick brown fox jumps")
    before = http.get("/v1/sessions/alice-1", headers=ALICE).json()
    assert http.get("/v1/sessions", headers=BOB).json()["data"] == []
    r = http.post("/v1/sessions/search", json={"query": "quick brown fox"}, headers=BOB)
    assert r.status_code == 200 and r.json()["data"] == []
    assert_not_found(http.get("/v1/sessions/alice-1", headers=BOB))
    assert_not_found(http.post("/v1/sessions/alice-1/fork", json={"new_id": "b"}, headers=BOB))
    assert_not_found(http.get("/v1/sessions/alice-1/export", headers=BOB))
    assert_not_found(http.delete("/v1/sessions/alice-1", headers=BOB))
    assert http.get("/v1/sessions/alice-1", headers=ALICE).json() == before
    assert http.get("/v1/sessions", headers=BOB).json()["data"] == []  # the fork made nothing


def test_chatting_on_another_tenants_session_id_starts_a_fresh_conversation(http, live_server):
    """Bob naming alice's session id gets his own new conversation: nothing from her memory,
    and hers stays as it was."""
    first = chat(http, live_server, ALICE, "shared-id", content="the quick brown fox jumps")
    before = http.get("/v1/sessions/shared-id", headers=ALICE).json()
    history = [
        {"role": "user", "content": "the quick brown fox jumps"},
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "and the dog?"},
    ]
    r = http.post(
        "/v1/chat/completions",
        json={"model": live_server.model, "messages": history, "max_tokens": 4,
              "session_id": "shared-id"},
        headers=BOB,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    bobs = r.json()
    assert bobs["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert bobs["agentmem"]["forked"] is False and bobs["agentmem"]["appended"] is False
    assert http.get("/v1/sessions/shared-id", headers=ALICE).json() == before
    # Bob's conversation is his own session of that id.
    assert [s["id"] for s in http.get("/v1/sessions", headers=BOB).json()["data"]] == ["shared-id"]
    assert http.get("/v1/sessions/shared-id", headers=BOB).json()["tokens"] != before["tokens"]
