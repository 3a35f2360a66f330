"""`agentmem serve` killed with SIGKILL in the middle of a streamed reply loses nothing it had
answered: restarted on the same root, the finished conversations are listed with the same tokens
and messages, and the next turn of one is served from memory. A session saves after each reply
(`agentmem.chat.engine.Run._settle`; one `Store.write_segment` transaction per save), so the one
killed mid-reply holds what its last finished reply saved: here, as its first reply never
finished, no tokens (its row is made when the reply starts: listed with 0 tokens and no
messages), or, were it saved, a session whose GET works and adds up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agentmem.testing import free_port
from tests.server.conftest import chat_turn

HEADERS = {"Authorization": "Bearer key-alice"}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def start(model: str, root: Path, keys: Path, log: Path,
          port: int | None = None) -> tuple[subprocess.Popen, str]:  # fmt: skip
    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentmem",
            "serve",
            "--model",
            model,
            "--root",
            str(root),
            "--port",
            str(port),
            "--api-keys",
            str(keys),
        ],  # fmt: skip
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not answer /health:\n{log.read_text()}")
        time.sleep(0.2)


def snapshot(http: httpx.Client) -> dict[str, dict]:
    listed = http.get("/v1/sessions")
    assert listed.status_code == 200, listed.text
    out = {}
    for info in listed.json()["data"]:
        got = http.get(f"/v1/sessions/{info['id']}")
        assert got.status_code == 200, got.text
        out[info["id"]] = {"tokens": info["tokens"], **got.json()}
    return out


def test_sigkill_mid_stream_keeps_finished_sessions(tiny_model, tmp_path):
    root, keys, log = tmp_path / "root", tmp_path / "keys.json", tmp_path / "server.log"
    keys.write_text(json.dumps({"key-alice": "alice", "key-bob": "bob"}))
    histories: dict[str, list[dict]] = {"a": [], "b": []}
    held: dict[str, int] = {}

    process, url = start(tiny_model, root, keys, log)
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=120) as http:
            for session_id, history in histories.items():
                for n in (1, 2):
                    body = chat_turn(
                        http, tiny_model, session_id, history, f"{session_id} turn {n}"
                    )
                usage = body["usage"]
                held[session_id] = usage["prompt_tokens"] + usage["completion_tokens"]
            before = snapshot(http)
            assert {k: v["tokens"] for k, v in before.items()} == held

            # a long streamed reply on a third session, killed once its first text arrived
            request = {
                "model": tiny_model, "stream": True, "max_tokens": 4000, "session_id": "c",
                "messages": [{"role": "user", "content": "c turn 1: write at length"}],
            }  # fmt: skip
            chunks = 0
            with http.stream("POST", "/v1/chat/completions", json=request) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: ") and '"content"' in line:
                        chunks += 1
                        if chunks >= 3:  # the role chunk and two with text
                            os.kill(process.pid, signal.SIGKILL)
                            break
            assert chunks >= 3
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    # Restarted where it listened (its name in the store's leases: host and port), it takes
    # back the lease of the session its reply was killed in at once.
    process, url = start(tiny_model, root, keys, log, port=int(url.rsplit(":", 1)[1]))
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=120) as http:
            after = snapshot(http)
            killed = after.pop("c", None)
            assert after.keys() == before.keys() == {"a", "b"}
            for session_id in ("a", "b"):
                assert after[session_id]["tokens"] == before[session_id]["tokens"]
                assert after[session_id]["messages"] == before[session_id]["messages"]
            if killed is None:  # never saved: absent, and GET says so
                assert http.get("/v1/sessions/c").status_code == 404
            else:  # made (its row) but never saved, or saved whole: what it lists adds up
                ends = [(m["start"], m["end"]) for m in killed["messages"]]
                assert ends == sorted(ends) and all(e <= killed["tokens"] for _, e in ends)
                if killed["tokens"] == 0:
                    assert killed["messages"] == []
            # the killed conversation can go on: re-sent, it gets what the session holds
            c = chat_turn(http, tiny_model, "c", [], "c turn 1: write at length")
            held_c = 0 if killed is None else killed["tokens"]
            assert c["usage"]["prompt_tokens_details"]["cached_tokens"] <= held_c

            # the next turn of "a", re-sending the whole conversation, is served from memory
            body = chat_turn(http, tiny_model, "a", histories["a"], "a turn 3")
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == held["a"]
            assert not body["agentmem"]["forked"]
            assert (
                body["agentmem"]["prefilled_tokens"] == body["usage"]["prompt_tokens"] - held["a"]
            )
            # and "b" was not touched by it
            assert http.get("/v1/sessions/b").json()["tokens"] == held["b"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
