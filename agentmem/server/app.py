"""`agentmem serve`: an OpenAI-compatible chat server whose conversations live in agentmem's
persistent memory (FastAPI). See docs/server.md for the endpoints and their rules."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentmem import chat
from agentmem.chat import engine
from agentmem.persistence import Store
from agentmem.persistence.errors import InvalidId, SessionExists
from agentmem.persistence.ids import check_id
from agentmem.server import schema
from agentmem.server.completion import RETRY_AFTER_S, Completion, as_api_error, submit
from agentmem.server.metrics import Metrics
from agentmem.server.schema import ApiError, ChatCompletionRequest
from agentmem.server.web import add_web
from agentmem.server.worker import Worker

DEFAULT_TENANT = "default"


class ForkRequest(BaseModel):
    new_id: str = Field(min_length=1, max_length=200)


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=10_000)
    k: int = Field(default=5, ge=1, le=100)


def create_app(
    model: str,
    store: Store,
    *,
    api_keys: dict[str, str] | None = None,
    max_queue: int = 64,
    max_active: int = 8,
    server_id: str | None = None,
) -> FastAPI:
    """The app serving `model` (a built-in name or a path) with sessions in `store`.
    `api_keys`: key -> tenant (every request then needs `Authorization: Bearer <key>`); None:
    no keys, every request is the "default" tenant's. `server_id`: its name in the store's
    session leases (`agentmem serve`: host and port, so that a restart there resumes its
    sessions at once); default: a name of its own."""
    holder: dict[str, Any] = {}

    def depth() -> tuple[int, int]:
        return holder["worker"].depth() if "worker" in holder else (0, 0)

    metrics = Metrics(depth, engine.tokens_held)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(chat.language_model, model)  # loaded before the first request
        worker = holder["worker"] = Worker(
            store,
            max_queue=max_queue,
            max_active=max_active,
            on_step=metrics.step.observe,
            holder=server_id,
        )
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="agentmem", version="0.1.0", lifespan=lifespan)

    def tenant_of(authorization: str | None) -> str:
        if api_keys is None:
            return DEFAULT_TENANT
        key = (authorization or "").removeprefix("Bearer ").strip()
        if key not in api_keys:
            raise ApiError(
                401,
                "a valid API key is needed: Authorization: Bearer <key>",
                type="authentication_error",
                code="invalid_api_key",
            )
        return api_keys[key]

    # -- errors: OpenAI's shape, and never a 5xx for a bad request -------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        try:  # a request without a valid key learns nothing of what its body should be
            tenant_of(request.headers.get("authorization"))
        except ApiError as refused:
            return await api_error(request, refused)
        problems = []
        for err in e.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        first = e.errors()[0].get("loc", ()) if e.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return await api_error(request, ApiError(400, "; ".join(problems), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        return await api_error(request, as_api_error(e))

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path=path, status=str(response.status_code)).inc()
        return response

    # -- the service -----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict:
        waiting, running = depth()
        return {"status": "ok", "model": model, "waiting": waiting, "running": running}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(default=None)) -> dict:
        tenant_of(authorization)
        return {"object": "list", "data": [_model_card(model)]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str, authorization: str | None = Header(default=None)) -> dict:
        tenant_of(authorization)
        if name != model:
            raise ApiError(
                404,
                f"no model {name!r}: this server serves {model!r}",
                type="not_found_error",
                code="model_not_found",
            )
        return _model_card(model)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        authorization: str | None = Header(default=None),
        x_session_id: str | None = Header(default=None),
    ) -> Response:
        tenant = tenant_of(authorization)
        if body.model != model:
            raise ApiError(
                404,
                f"no model {body.model!r}: this server serves {model!r}",
                param="model",
                type="not_found_error",
                code="model_not_found",
            )
        session_id = body.session_id or x_session_id
        if session_id is not None:
            _check_id(session_id, "session_id")
        reply = schema.reply(body, model=model, session_id=session_id, tenant=tenant)
        arrived = time.perf_counter()
        items = submit(holder["worker"], reply)
        first = await items.get()  # after the prefill: a bad history fails here, with a 4xx
        if isinstance(first, Exception):
            items.job.cancel.set()
            raise as_api_error(first)
        metrics.ttft.observe(time.perf_counter() - arrived)
        completion = Completion(model, body, items, first)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                completion.sse(include_usage, request, metrics, arrived),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            result = await completion.whole()
        except Exception as e:  # answered here: the server's error middleware would log it
            raise as_api_error(e) from None
        metrics.latency.observe(time.perf_counter() - arrived)
        completion.count(metrics)
        return JSONResponse(result)

    # -- sessions --------------------------------------------------------------------------------

    @app.get("/v1/sessions")
    async def sessions(authorization: str | None = Header(default=None)) -> dict:
        tenant = tenant_of(authorization)
        found = await asyncio.to_thread(store.sessions, tenant=tenant)
        return {"object": "list", "data": [_session(info) for info in found]}

    @app.post("/v1/sessions/search")
    async def search(body: SearchRequest, authorization: str | None = Header(default=None)):
        tenant = tenant_of(authorization)
        hits = await asyncio.to_thread(store.search, body.query, tenant=tenant, k=body.k)
        return {
            "object": "list",
            "data": [
                {
                    "session_id": h.session_id,
                    "role": h.message[0],
                    "text": h.message[1],
                    "start": h.start,
                    "end": h.end,
                    "score": h.score,
                }
                for h in hits
            ],
        }

    @app.get("/v1/sessions/{session_id}")
    async def session(session_id: str, authorization: str | None = Header(default=None)):
        tenant = tenant_of(authorization)
        info = _found(store, session_id, tenant)
        messages = await asyncio.to_thread(store.messages, session_id, tenant=tenant)
        return {
            **_session(info),
            "messages": [
                {"role": m.role, "text": m.text, "start": m.start, "end": m.end} for m in messages
            ],
        }

    @app.delete("/v1/sessions/{session_id}")
    async def delete(session_id: str, authorization: str | None = Header(default=None)):
        tenant = tenant_of(authorization)
        _found(store, session_id, tenant)
        _not_busy(holder["worker"], tenant, session_id)
        await asyncio.to_thread(engine.forget, model, session_id, store, tenant)
        await asyncio.to_thread(store.delete, session_id, tenant=tenant)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork(
        session_id: str, body: ForkRequest, authorization: str | None = Header(default=None)
    ):
        tenant = tenant_of(authorization)
        _check_id(body.new_id, "new_id")
        _found(store, session_id, tenant)
        _not_busy(holder["worker"], tenant, session_id)
        try:
            info = await asyncio.to_thread(store.fork, session_id, body.new_id, tenant=tenant)
        except SessionExists:
            raise ApiError(
                409,
                f"a session {body.new_id!r} exists already",
                param="new_id",
                code="session_exists",
            ) from None
        return _session(info)

    @app.get("/v1/sessions/{session_id}/export")
    async def export(session_id: str, authorization: str | None = Header(default=None)):
        tenant = tenant_of(authorization)
        _found(store, session_id, tenant)
        scratch = Path(tempfile.mkdtemp(prefix="agentmem-export-"))
        path = await asyncio.to_thread(
            store.export_session, session_id, scratch / "session.tar", tenant=tenant
        )
        return FileResponse(
            path,
            media_type="application/x-tar",
            filename=f"{session_id}.tar",
            background=BackgroundTask(_remove, scratch),
        )

    add_web(app, api_keys is not None)
    return app


def _model_card(model: str) -> dict:
    return {"id": model, "object": "model", "created": 0, "owned_by": "agentmem"}


def _session(info) -> dict:
    return {
        "id": info.id,
        "object": "session",
        "tokens": info.tokens,
        "created": int(info.created.timestamp()),
        "updated": int(info.updated.timestamp()),
        "parent": info.parent,
    }


def _check_id(value: str, param: str) -> None:
    try:
        check_id(value, param)
    except (InvalidId, ValueError) as e:
        raise ApiError(400, str(e), param=param) from None


def _found(store: Store, session_id: str, tenant: str):
    _check_id(session_id, "session_id")
    info = store.session_info(session_id, tenant=tenant)
    if info is None:  # another tenant's is as absent as none
        raise ApiError(
            404, f"no session {session_id!r}", type="not_found_error", code="session_not_found"
        )
    return info


def _not_busy(worker: Worker, tenant: str, session_id: str) -> None:
    if worker.is_busy(tenant, session_id):
        raise ApiError(
            409,
            f"session {session_id!r} is in a reply now; retry once it ended",
            code="session_busy",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["create_app"]
