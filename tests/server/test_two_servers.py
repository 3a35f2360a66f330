"""Two `agentmem serve` apps on loopback sharing one store (PostgreSQL and one payload root), as
behind a load balancer: a session saved by one resumes on the other, each reads the other's
turns, and while one writes a session the other is refused it (the lease in the database)."""

from __future__ import annotations

import httpx
import pytest

from agentmem.persistence import Store
from agentmem.server.app import create_app
from agentmem.testing import free_port, run_server
from tests.persistence.conftest import postgres_server  # noqa: F401  (a fixture)


@pytest.fixture
def two_servers(tiny_model, postgres_server, tmp_path):  # noqa: F811
    url, root = postgres_server.new_database(), tmp_path / "shared-root"
    running, clients = [], []
    for _ in range(2):
        store = Store(url, root)
        port = free_port()
        server, thread = run_server(create_app(tiny_model, store), port)
        running.append((server, thread, store))
        clients.append(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120))
    yield tiny_model, clients
    for client in clients:
        client.close()
    for server, thread, store in running:
        server.should_exit = True
        thread.join(timeout=60)
        store.close()


def turn(client, model, text, max_tokens=6, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "session_id": "shared", **extra}  # fmt: skip
    return client.post("/v1/chat/completions", json=body)


def held(reply) -> int:
    usage = reply.json()["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"]


def test_each_server_continues_what_the_other_wrote(two_servers):
    model, (a, b) = two_servers
    first = turn(a, model, "hello")
    assert first.status_code == 200, first.text
    second = turn(b, model, "and on the other server?")  # only the new message
    assert second.status_code == 200, second.text
    assert second.json()["agentmem"]["appended"] is True
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == held(first)
    third = turn(a, model, "back again")  # a reads b's turn from the store, not its old copy
    assert third.status_code == 200, third.text
    assert third.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == held(second)
    listed = {s["id"]: s["tokens"] for s in b.get("/v1/sessions").json()["data"]}
    assert listed["shared"] == held(third)


def test_a_session_being_written_by_one_server_is_refused_by_the_other(two_servers):
    model, (a, b) = two_servers
    assert turn(a, model, "hello").status_code == 200
    body = {"model": model, "messages": [{"role": "user", "content": "a long one"}],
            "max_tokens": 48, "session_id": "shared", "stream": True}  # fmt: skip
    with a.stream("POST", "/v1/chat/completions", json=body) as streaming:
        lines = streaming.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # a is writing it
        refused = turn(b, model, "me too")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "session_leased"
        assert refused.headers["retry-after"] == "1"
        assert any(line == "data: [DONE]" for line in lines)
    later = turn(b, model, "me too")  # a let the lease go with its reply's end
    assert later.status_code == 200, later.text
