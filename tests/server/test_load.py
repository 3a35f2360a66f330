"""Many clients at once: N clients, each on its own session, M turns each, all in flight together
(threads, real HTTP). Every turn is answered; each session's stored messages hold its own user
turns in order and nobody else's (no cross-talk, no lost turn); from the second turn on, what
the session held (the previous turn's prompt + reply) is served from memory."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.server.conftest import chat_turn

CLIENTS, TURNS, MAX_TOKENS = 8, 4, 6
HEADERS = {"Authorization": "Bearer key-alice"}
MARKER = re.compile(r"client\d+-turn\d+")


def marker(client: int, turn: int) -> str:
    return f"client{client}-turn{turn}"


def converse(url: str, model: str, client: int, start: threading.Barrier) -> list[dict]:
    """One client's conversation, re-sending the whole history each turn (as OpenAI clients do);
    the JSON of each turn's reply."""
    session_id = f"load-{client}"
    history: list[dict] = [{"role": "system", "content": f"You are assistant {client}."}]
    replies = []
    with httpx.Client(base_url=url, headers=HEADERS, timeout=300) as http:
        start.wait()
        for turn in range(1, TURNS + 1):
            text = f"{marker(client, turn)}: say something, please."
            replies.append(chat_turn(http, model, session_id, history, text, MAX_TOKENS))
    return replies


def test_concurrent_clients_keep_their_own_sessions(live_server):
    start = threading.Barrier(CLIENTS)
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [
            pool.submit(converse, live_server.url, live_server.model, c, start)
            for c in range(CLIENTS)
        ]
        results = [f.result() for f in futures]  # a failed turn raises here

    with httpx.Client(base_url=live_server.url, headers=HEADERS, timeout=60) as http:
        listed = {s["id"]: s for s in http.get("/v1/sessions").json()["data"]}
        assert set(listed) == {f"load-{c}" for c in range(CLIENTS)}
        for client, replies in enumerate(results):
            session_id = f"load-{client}"
            assert len(replies) == TURNS
            for turn, reply in enumerate(replies, 1):
                meta, usage = reply["agentmem"], reply["usage"]
                assert meta["session_id"] == session_id
                assert usage["completion_tokens"] >= 1
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                if turn == 1:
                    assert cached == 0, (client, turn, usage)
                else:
                    before = replies[turn - 2]["usage"]
                    held = before["prompt_tokens"] + before["completion_tokens"]
                    assert cached == held, (client, turn, usage, before)  # served from memory
                    assert not meta["forked"], (client, turn, meta)
                assert meta["prefilled_tokens"] == usage["prompt_tokens"] - cached

            stored = http.get(f"/v1/sessions/{session_id}")
            assert stored.status_code == 200, stored.text
            session = stored.json()
            last = replies[-1]["usage"]
            assert session["tokens"] == last["prompt_tokens"] + last["completion_tokens"]
            messages = session["messages"]
            # every marker the session holds is its own, each turn's once, in order
            found = [m for msg in messages for m in MARKER.findall(msg["text"])]
            assert found == [marker(client, t) for t in range(1, TURNS + 1)], (client, found)
            users = [msg for msg in messages if msg["role"] == "user"]
            with_marker = [msg for msg in users if MARKER.search(msg["text"])]
            assert [MARKER.findall(msg["text"]) for msg in with_marker] == [
                [marker(client, t)] for t in range(1, TURNS + 1)
            ], (client, users)
            # the messages tile the session's tokens in order
            ends = [(msg["start"], msg["end"]) for msg in messages]
            assert ends == sorted(ends) and all(s < e for s, e in ends)
            assert ends[-1][1] <= session["tokens"]
