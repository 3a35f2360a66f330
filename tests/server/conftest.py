"""A live `agentmem serve` app on loopback for the server's tests: the tiny chat model
(`agentmem.testing`), a throwaway SQLite store, two tenants' API keys. uvicorn runs it in a
thread of the test process, so the tests reach it over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from agentmem import testing
from agentmem.chat import engine
from agentmem.persistence import Store
from agentmem.server.app import create_app

KEYS = {"key-alice": "alice", "key-bob": "bob"}


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:<port>
    model: str  # the model's name as the server serves it (the tiny model's directory)
    store: Store

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(app, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return server, thread


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
