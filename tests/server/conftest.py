"""A live `agentmem serve` app on loopback for the server's tests: the tiny chat model
(`agentmem.testing`), a throwaway SQLite store, two tenants' API keys. uvicorn runs it in a
thread of the test process, so the tests reach it over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agentmem import testing
from agentmem.chat import engine
from agentmem.persistence import Store
from agentmem.server.app import create_app
from agentmem.testing import free_port, run_server

KEYS = {"key-alice": "alice", "key-bob": "bob"}


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:<port>
    model: str  # the model's name as the server serves it (the tiny model's directory)
    store: Store

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return testing.model_dir()


@pytest.fixture
def live_server(tiny_model, tmp_path, request) -> Iterator[LiveServer]:
    """A fresh server (own store) per test. `@pytest.mark.server_options(max_queue=..., ...)`
    passes `create_app` options."""
    marker = request.node.get_closest_marker("server_options")
    options = {"api_keys": KEYS, **(marker.kwargs if marker else {})}
    engine._threads.clear()  # no conversation of an earlier test's server
    store = Store(root=tmp_path / "store")
    port = free_port()
    server, thread = run_server(create_app(tiny_model, store, **options), port)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", tiny_model, store)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        store.close()
        engine._threads.clear()


def chat_turn(http, model: str, session_id: str, history: list[dict], text: str,
              max_tokens: int = 6) -> dict:  # fmt: skip
    """One turn over `http` (an httpx client on the server): the user's `text` and the reply
    appended to `history`, the whole of it sent; the reply's JSON (a 200 is asserted)."""
    history.append({"role": "user", "content": text})
    body = {"model": model, "messages": history, "max_tokens": max_tokens,
            "session_id": session_id}  # fmt: skip
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, (session_id, response.text)
    reply = response.json()
    history.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    return reply
