"""`agentmem serve`: an OpenAI-compatible chat server with persistent sessions (the `server`
extra: FastAPI, uvicorn, prometheus-client). docs/server.md describes it."""

from __future__ import annotations

import json
from pathlib import Path


def read_api_keys(path: str | Path) -> dict[str, str]:
    """An API keys file: a JSON object mapping each key to its tenant."""
    try:
        keys = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the API keys file {str(path)!r}: {e}") from None
    if (
        not isinstance(keys, dict)
        or not keys
        or not all(isinstance(k, str) and k and isinstance(t, str) and t for k, t in keys.items())
    ):
        raise ValueError(f"{str(path)!r} must hold a JSON object of API key -> tenant name")
    return keys


def serve(
    model: str,
    *,
    store_url: str | None = None,
    store_root: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: str | None = None,
    max_queue: int = 64,
) -> None:
    """Serve `model` until interrupted."""
    import socket

    import uvicorn

    from agentmem.persistence import Store
    from agentmem.server.app import create_app

    keys = read_api_keys(api_keys) if api_keys else None
    with Store(store_url, store_root) as store:
        server_id = f"{socket.gethostname()[:48]}:{port}"  # one process listens there at a time
        app = create_app(model, store, api_keys=keys, max_queue=max_queue, server_id=server_id)
        uvicorn.run(app, host=host, port=port, log_level="info")
