"""A streaming client that leaves cancels its reply; what was generated until then stays in the
session's memory and is saved (docs/server.md, Disconnects)."""

from __future__ import annotations

import time

import httpx

MAX_TOKENS = 400  # far more than the reply gets to write before its client leaves


def test_a_client_that_leaves_stops_its_reply_and_the_tokens_so_far_are_kept(live_server):
    auth = {"Authorization": "Bearer key-alice"}
    body = {"model": live_server.model, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": MAX_TOKENS, "session_id": "left", "stream": True}  # fmt: skip
    with httpx.Client(base_url=live_server.url, headers=auth, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            seen = [line for _, line in zip(range(4), lines, strict=False)]
            assert all(line.startswith("data: ") or not line for line in seen)
        # The response is closed: the server notices at its next token and stops.
        deadline, tokens = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            found = http.get("/v1/sessions/left")
            if found.status_code == 200 and found.json()["tokens"] == tokens:
                break  # saved, and no longer growing
            tokens = found.json()["tokens"] if found.status_code == 200 else None
            time.sleep(0.5)
        session = http.get("/v1/sessions/left").json()
        prompt = session["messages"][-2]["end"]  # up to the generation prompt
        assert prompt < session["tokens"] < prompt + MAX_TOKENS  # kept, and cut short
        assert session["messages"][-1]["role"] == "assistant"  # the partial reply, recorded
        health = http.get("/health").json()
        assert health["running"] == 0 and health["waiting"] == 0
        # The next turn, only its new message, follows what memory holds: the partial reply.
        again = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2,
                          "messages": [{"role": "user", "content": "still there?"}]})  # fmt: skip
        assert again.status_code == 200, again.text
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == session["tokens"]
