"""Bad requests get a 4xx in OpenAI's error shape with a message that says what is wrong (never a
5xx); a full queue gets a 429 with Retry-After."""

from __future__ import annotations

import threading

import httpx
import pytest

ALICE = {"Authorization": "Bearer key-alice"}
USER = {"role": "user", "content": "hello"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, headers=ALICE, timeout=120) as client:
        yield client


def error_of(r: httpx.Response, status: int = 400) -> dict:
    """The error of an OpenAI-shaped error response of `status`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def post(http, live_server, **fields) -> httpx.Response:
    body = {"model": live_server.model, "messages": [USER], "max_tokens": 2, **fields}
    return http.post("/v1/chat/completions", json=body)


# (fields of the body, the param named, words the message must hold)
BAD_BODIES = {
    "empty messages": ({"messages": []}, "messages", ["messages", "at least 1"]),
    "bad role": (
        {"messages": [{"role": "wizard", "content": "hi"}]},
        "messages.0.role",
        ["role", "'user'"],
    ),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens", ["max_tokens", "greater than or equal to 1"]),
    "temperature 5": (
        {"temperature": 5},
        "temperature",
        ["temperature", "less than or equal to 2"],
    ),
    "n 2": ({"n": 2}, "n", ["n:", "less than or equal to 1"]),
    "unknown tool named": (
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        ["nope", "get_weather"],
    ),
    "tool_choice without tools": (
        {"tool_choice": "required"},
        "tool_choice",
        ["'required'", "needs tools"],
    ),
    "bad response_format": (
        {"response_format": {"type": "xml"}},
        "response_format",
        ["response_format", "json_object", "xml"],
    ),
    "tool message without tool_call_id": (
        {"messages": [USER, {"role": "tool", "content": "sunny"}]},
        "messages[1].tool_call_id",
        ["tool_call_id"],
    ),
    "invalid session id": (
        {"session_id": "no/slashes here"},
        "session_id",
        ["session_id", "'._:@-'"],
    ),
    "session id starting with a dot": ({"session_id": ".hidden"}, "session_id", ["session_id"]),
    "5 stop strings": ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ["stop", "at most 4"]),
    "empty stop string": ({"stop": [""]}, "stop", ["stop", "non-empty"]),
    "json and tools": (
        {"tools": [TOOL], "response_format": {"type": "json_object"}},
        None,
        ["JSON", "tools"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_BODIES), ids=list(BAD_BODIES))
def test_a_bad_body_is_a_400_saying_what_is_wrong(http, live_server, case):
    fields, param, words = BAD_BODIES[case]
    error = error_of(post(http, live_server, **fields))
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


def test_an_invalid_session_id_header_is_a_400(http, live_server):
    r = http.post(
        "/v1/chat/completions",
        json={"model": live_server.model, "messages": [USER], "max_tokens": 2},
        headers={"X-Session-ID": "bad id!"},
    )
    error = error_of(r)
    assert error["param"] == "session_id" and "bad id!" in error["message"]


def test_a_body_that_is_not_json_is_a_400(http, live_server):
    r = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


def test_a_missing_field_is_named(http, live_server):
    r = http.post("/v1/chat/completions", json={"messages": [USER]})
    error = error_of(r)
    assert error["param"] == "model" and "model" in error["message"]


def test_an_unknown_path_is_a_404_in_openai_shape(http, live_server):
    error = error_of(http.get("/v1/nothing-here"), 404)
    assert error["type"] == "not_found_error"


def test_a_bad_request_leaves_the_server_serving(http, live_server):
    """After a run of bad requests, a good one is answered."""
    for fields, _, _ in BAD_BODIES.values():
        assert post(http, live_server, **fields).status_code == 400
    r = post(http, live_server)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.server_options(max_queue=1, max_active=1)
def test_a_full_queue_is_a_429_with_retry_after(live_server):
    """One reply runs, one waits: the others sent at once get a 429 with Retry-After, and every
    request not turned away is answered in full."""
    n = 6
    start = threading.Barrier(n)
    results: list[httpx.Response | BaseException] = [None] * n  # type: ignore[list-item]

    def send(i: int) -> None:
        body = {"model": live_server.model, "messages": [USER], "max_tokens": 60}
        with httpx.Client(base_url=live_server.url, headers=ALICE, timeout=120) as client:
            start.wait()
            try:
                results[i] = client.post("/v1/chat/completions", json=body)
            except BaseException as e:  # noqa: BLE001 (reported below)
                results[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(r, httpx.Response) for r in results), results
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {200, 429}, statuses
    busy = [r for r in results if r.status_code == 429]
    done = [r for r in results if r.status_code == 200]
    assert busy, f"no request was turned away: {statuses}"
    assert done, statuses
    for r in busy:
        assert r.headers["Retry-After"] == "1"
        error = error_of(r, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    for r in done:
        assert r.json()["usage"]["completion_tokens"] == 60
