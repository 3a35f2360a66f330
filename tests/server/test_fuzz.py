"""Property-based fuzzing of the live server's OpenAPI schema (/openapi.json) with schemathesis:
every operation gets schema-valid (positive) and schema-breaking (negative) requests, with
alice's API key, and none may be answered with a 5xx.

Bounded for a small CPU box: a few dozen examples per operation and mode, no deadline, and a
reply's `max_tokens` / `max_completion_tokens` capped at 8 (the schema allows 32768, which the
tiny model would take minutes to write). Half the chat requests name the served model, so that
the requests reach the model and its memory, not only the 404 of an unknown model."""

from __future__ import annotations

import collections
import json
import time

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

AUTH = {"authorization": "Bearer key-alice"}
MAX_TOKENS = 8
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 20}
CHAT_EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 30}
KNOWN = ("known-1", "known-2")  # sessions alice holds, made again before each operation
TIMEOUT_S = 120  # a long generated history takes seconds to prefill on a busy 2-core machine
MAX_TEXT = 400  # characters of a message's content: longer ones only make the run slow


def bounded(case, model: str, name_the_model: bool, known: str | None) -> None:
    """The generated case with its reply capped at MAX_TOKENS (values the schema rejects, like
    0 or -3, are kept: they must get a 400) and, when asked, the served model's name and a
    session that exists (in the path or the body)."""
    if known is not None and case.path_parameters and "session_id" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "session_id": known}
    case.body = _bounded_body(case.body, model, name_the_model, known)


def _bounded_body(body, model: str, name_the_model: bool, known: str | None):
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if not any(body.get(key) for key in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = MAX_TOKENS  # the default (512) would be slow (null is the default)
    if name_the_model and "model" in body:
        body["model"] = model
    if known is not None and "messages" in body:
        body["session_id"] = known
    if name_the_model:
        _repair(body)
    return body


def _repair(body: dict) -> None:
    """Mend what the schema cannot say (the server's own 400s), so that more requests get to the
    model: a message with no content, a tool result with no call id, a bad session id, more
    than 4 stops, tools of one name, a response_format that is no JSON mode."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                if m.get("role") == "tool" and not m.get("tool_call_id"):
                    m["tool_call_id"] = "call-0"
                if m.get("content") is None and m.get("role") != "tool":
                    m["content"] = "fuzz"
                if isinstance(m.get("content"), str):
                    m["content"] = m["content"][:MAX_TEXT]
    session_id = body.get("session_id")
    if isinstance(session_id, str) and not session_id.isascii() or session_id == "":
        body["session_id"] = "fuzz-" + str(abs(hash(session_id)) % 1000)
    stop = body.get("stop")
    if isinstance(stop, list):
        body["stop"] = [s for s in stop if s][:4]
    elif stop == "":
        body.pop("stop")
    tools = body.get("tools")
    if isinstance(tools, list):
        seen, kept = set(), []
        for t in tools:
            name = (t.get("function") or {}).get("name") if isinstance(t, dict) else None
            if name not in seen:
                seen.add(name)
                kept.append(t)
        body["tools"] = kept
        if kept and "response_format" in body:
            body.pop("response_format")
    if isinstance(body.get("response_format"), dict):
        if body["response_format"].get("type") not in ("json_object", "text"):
            body["response_format"] = {"type": "json_object"}


def test_no_request_gets_a_5xx(live_server):
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    http = requests.Session()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    started = time.monotonic()
    reasons = collections.Counter()
    recent = collections.deque(maxlen=6)

    def run_cases(strategy, examples: int, label: str, mode: GenerationMode) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        @given(
            case=strategy,
            name_the_model=st.sampled_from((True, True, True, False)),  # 3 in 4 name it
            known=st.sampled_from((None, *KNOWN)),
        )
        def fuzz(case, name_the_model, known):
            bounded(case, live_server.model, name_the_model, known)
            sent = (
                f"{case.method} {case.formatted_path} headers={case.headers} "
                f"query={case.query} body={json.dumps(case.body, default=str)[:1500]}"
            )
            recent.append(sent)
            try:
                response = case.call(base_url=live_server.url, session=http, timeout=TIMEOUT_S)
            except requests.RequestException as e:  # no answer at all: as bad as a 5xx
                health = requests.get(live_server.url + "/health", timeout=10).text
                failures.append(
                    f"{label}: no response ({type(e).__name__}); /health {health}; "
                    "the last requests:\n    " + "\n    ".join(recent)
                )
                raise AssertionError(failures[-1]) from None
            status = response.status_code
            counts[label]["cases"] += 1
            counts[label][f"{status // 100}xx"] += 1
            counts[label][mode.value] += 1
            if 400 <= status < 500 and "chat" in label:
                reasons[(mode.value, name_the_model, status, response.text[:90])] += 1
            if status >= 500:
                failures.append(
                    f"{label} -> {status}: {response.text[:500]}\n"
                    f"    {case.as_curl_command(headers=AUTH)}"
                )
            assert status < 500, failures[-1]

        try:
            fuzz()
        except Unsatisfiable:  # nothing to break: no parameters, no body (GET /health)
            assert mode is GenerationMode.NEGATIVE, label
            counts[label]["no_negative"] += 1

    def ensure_known() -> None:
        for session_id in KNOWN:
            if http.get(f"{live_server.v1}/sessions/{session_id}", headers=AUTH).status_code == 404:
                made = http.post(
                    f"{live_server.v1}/chat/completions",
                    headers=AUTH,
                    json={
                        "model": live_server.model,
                        "messages": [{"role": "user", "content": f"hello {session_id}"}],
                        "max_tokens": 2,
                        "session_id": session_id,
                    },
                    timeout=TIMEOUT_S,
                )
                assert made.status_code == 200, made.text

    for result in schema.get_all_operations():
        operation = result.ok()
        ensure_known()
        label = operation.label
        is_chat = operation.path == "/v1/chat/completions"
        for mode, examples in (CHAT_EXAMPLES if is_chat else EXAMPLES).items():
            strategy = operation.as_strategy(generation_mode=mode, headers=AUTH)
            run_cases(strategy, examples, label, mode)

    elapsed = time.monotonic() - started
    total = sum(counts.values(), collections.Counter())
    lines = [""]  # the counts, for the record (pytest -s shows them)
    for label, c in sorted(counts.items()):
        lines.append(
            f"fuzz {label:<40} cases {c['cases']:>4}  2xx {c['2xx']:>4}  4xx {c['4xx']:>4}  "
            f"5xx {c['5xx']:>3}"
        )
    other = total["cases"] - total["2xx"] - total["4xx"] - total["5xx"]
    lines.append(
        f"fuzz TOTAL {len(counts)} operations: cases {total['cases']}, 2xx {total['2xx']}, "
        f"4xx {total['4xx']}, 5xx {total['5xx']}, other {other} in {elapsed:.1f} s"
    )
    lines += [f"reason {v} {k}" for k, v in reasons.most_common(15)]
    print("\n".join(lines))  # noqa: T201
    assert not failures, "\n".join(failures)
    assert len(counts) >= 10  # every operation was fuzzed
