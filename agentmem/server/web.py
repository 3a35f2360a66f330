"""The chat page `agentmem serve` shows at "/": one self-contained HTML file (inline CSS and JS,
no build step, works offline) that talks to the server's own OpenAI-compatible endpoints."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "index.html"
KEYS_MARK = "__AGENTMEM_KEYS_NEEDED__"


def add_web(app: FastAPI, api_keys_needed: bool) -> None:
    """Serve the chat page at GET "/" on `app`. `api_keys_needed`: whether the page asks for an
    API key (kept in the browser's localStorage, sent as `Authorization: Bearer <key>`)."""
    needed = "true" if api_keys_needed else "false"
    html = PAGE.read_text(encoding="utf-8").replace(KEYS_MARK, needed)  # read once

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


__all__ = ["add_web"]
