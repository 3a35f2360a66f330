"""One chat completion's reply as it comes from the model worker, answered in OpenAI's shapes:
the whole `chat.completion`, or `chat.completion.chunk`s as server-sent events; errors as
`ApiError`s."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from agentmem import chat
from agentmem.persistence.errors import InvalidId
from agentmem.server.metrics import Metrics
from agentmem.server.schema import ApiError, ChatCompletionRequest
from agentmem.server.worker import Job, QueueFull, Worker

RETRY_AFTER_S = 1


class Items:
    """The items a job emits on the worker thread, awaited on the event loop."""

    def __init__(self, job_reply: chat.Reply, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job = Job(
            job_reply, emit=lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)
        )

    async def get(self) -> Any:
        return await self.queue.get()


def submit(worker: Worker, reply: chat.Reply) -> Items:
    items = Items(reply, asyncio.get_running_loop())
    try:
        worker.submit(items.job)
    except QueueFull:
        raise ApiError(
            429,
            "the server is busy: every place in its queue is taken; retry soon",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    return items


class Completion:
    """One chat completion's reply as it comes: text, tool calls (OpenAI's shape: arguments as
    a JSON string), and its outcome."""

    def __init__(self, model: str, body: ChatCompletionRequest, items: Items, first: Any):
        self.model, self.body, self.items, self.first = model, body, items, first
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.outcome: chat.Outcome | None = None
        self.calls: list[dict] = []

    async def _items(self) -> AsyncIterator[Any]:
        item = self.first
        while True:
            if isinstance(item, Exception):
                raise item
            if isinstance(item, chat.Outcome):
                self.outcome = item
                return
            yield item
            item = await self.items.get()

    async def whole(self) -> dict:
        text: list[str] = []
        async for item in self._items():
            if item.call is not None:
                self.calls.append(_openai_call(item.call, len(self.calls)))
            elif item.name is None and item.args is None:
                text.append(item.text)
        calls = [{k: v for k, v in c.items() if k != "index"} for c in self.calls]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
        if calls:
            message["tool_calls"] = calls
        elif message["content"] is None:
            message["content"] = ""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish()}
            ],
            "usage": self._usage(),
            "agentmem": self._agentmem(),
        }

    async def sse(
        self, include_usage: bool, request: Request, metrics: Metrics, arrived: float
    ) -> AsyncIterator[str]:
        """OpenAI's chunks as server-sent events, then `data: [DONE]`. A client that leaves
        cancels the reply: what was generated stays in the session's memory."""
        try:
            yield self._sse({"role": "assistant", "content": ""})
            streamed: dict[int, bool] = {}  # a call's index -> whether its arguments streamed
            async for item in self._items():
                if isinstance(item, chat.Outcome):
                    break
                if item.call is None and item.name is None and item.args is None:
                    yield self._sse({"content": item.text})
                elif item.call is None and item.name is not None:  # a call begun
                    streamed[item.index] = True
                    yield self._sse(
                        {
                            "tool_calls": [
                                {
                                    "index": item.index,
                                    "id": item.id,
                                    "type": "function",
                                    "function": {"name": item.name, "arguments": ""},
                                }
                            ]
                        }
                    )
                elif item.call is None:  # a piece of its arguments
                    yield self._sse(
                        {
                            "tool_calls": [
                                {"index": item.index, "function": {"arguments": item.args}}
                            ]
                        }
                    )
                else:
                    call = _openai_call(item.call, item.index)
                    self.calls.append(call)
                    if not streamed.get(item.index):
                        yield self._sse({"tool_calls": [call]})
            yield self._sse({}, finish=self._finish())
            if include_usage:
                yield _event({**self._head(), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
            metrics.latency.observe(time.perf_counter() - arrived)
            self.count(metrics)
        except Exception as e:  # the status line went out already: the error is an event
            yield _event(as_api_error(e).body())
            yield "data: [DONE]\n\n"
        finally:
            self.items.job.cancel.set()  # a no-op once the reply ended; else the client left

    def count(self, metrics: Metrics) -> None:
        if self.outcome is not None:
            o = self.outcome
            metrics.tokens.labels(kind="prompt").inc(o.input_tokens)
            metrics.tokens.labels(kind="cached").inc(o.cached_tokens)
            metrics.tokens.labels(kind="completion").inc(o.output_tokens)

    def _head(self) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def _sse(self, delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk = {**self._head(), "choices": [choice]}
        if finish is not None:
            chunk["agentmem"] = self._agentmem()
        return _event(chunk)

    def _finish(self) -> str:
        reason = self.outcome.finish_reason if self.outcome else "stop"
        if reason == "stop" and any(c["type"] == "function" for c in self.calls):
            return "tool_calls"
        return "stop" if reason == "cancelled" else reason

    def _usage(self) -> dict:
        o = self.outcome
        return {
            "prompt_tokens": o.input_tokens,
            "completion_tokens": o.output_tokens,
            "total_tokens": o.input_tokens + o.output_tokens,
            "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
        }

    def _agentmem(self) -> dict:
        """What agentmem adds: the session the reply went to, whether the history forked or
        was taken as new messages, how much was prefilled, the past messages recalled."""
        o = self.outcome
        return {
            "session_id": o.session_id,
            "forked": o.forked,
            "appended": o.appended,
            "prefilled_tokens": o.input_tokens - o.cached_tokens,
            "recalled_messages": o.recalled_messages,
        }


def _openai_call(call: dict, index: int) -> dict:
    """A parsed call in OpenAI's shape; an invalid one keeps its arguments as written."""
    if call["type"] == "tool_call":
        arguments = json.dumps(call["args"], ensure_ascii=False)
    else:
        arguments = call.get("args") or ""
    return {
        "index": index,
        "id": call["id"],
        "type": "function",
        "function": {"name": call.get("name") or "", "arguments": arguments},
    }


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValueError | InvalidId):
        return ApiError(400, str(e))
    if isinstance(e, ConnectionAbortedError):
        return ApiError(499, str(e), code="client_closed_request")
    return ApiError(500, f"the reply failed: {type(e).__name__}: {e}", type="server_error")
