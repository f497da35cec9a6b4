"""The HTTP layer: a thin FastAPI app over the engine, speaking the OpenAI API.

Routes: `GET /health` (200 once the model is loaded and the engine runs; 503 while loading, after a
failure, or while draining for shutdown), `GET /metrics` (Prometheus), `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions` (both with `stream` as server-sent events).

Before any handler runs, `Gate` checks the API key (everything but /health) and the body's size
(its Content-Length, then the bytes actually received), and counts requests per endpoint and status.
Bodies are parsed here rather than by FastAPI, so that every malformed one gets the OpenAI error body
with a 400 (text that is not valid Unicode included). A client that goes away cancels its sequences:
streams when their response ends, other requests through a task that watches for the disconnect; one
that goes away before its body has arrived is counted as 499, not as a server error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..tokenizer import Tokenizer
from . import errors
from .engine import Engine
from .errors import APIError
from .job import Job, Mailbox
from .metrics import CONTENT_TYPE, Metrics
from .requests import Limits, Plan, chat_plan, completion_plan
from .responses import chat_chunks, chat_completion, completion, completion_chunks
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

__all__ = ["Backend", "ServerState", "Settings", "create_app"]

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first: counted, never sent
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class Backend:
    """What the server serves: a model's engine, its tokenizer, the name clients ask for it by."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    defaults: dict[str, Any] = field(default_factory=dict)  # generation_config.json's sampling settings
    stop_tokens: frozenset[int] = frozenset()  # end-of-sequence ids
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Settings:
    """The HTTP side's knobs (the engine's are the Engine's)."""

    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 8 * 2**20
    max_n: int = 16
    max_logprobs: int = 20


class ServerState:
    """Loading, serving, draining: what /health reports and what every request checks first."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backend: Backend | None = None
        self.load_error: str | None = None
        self.draining = False
        self.mailbox: Mailbox | None = None

    def attach(self, backend: Backend, mailbox: Mailbox) -> None:
        engine = backend.engine
        engine.observer = self.metrics
        engine.after_step = mailbox.flush
        self.mailbox = mailbox
        self.metrics.bind(lambda: engine.queue_length, lambda: engine.slots_in_use, engine.slots)
        if not engine.started:
            engine.start()
        self.backend = backend

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.load_error is not None:
            return 503, {"status": "failed", "error": self.load_error}
        if self.backend is None:
            return 503, {"status": "loading"}
        engine = self.backend.engine
        if not engine.alive:
            return 503, {"status": "failed", "error": engine.error or "the engine is not running"}
        status = "draining" if self.draining else "ok"
        body = {"status": status, "slots": engine.slots, "slots_in_use": engine.slots_in_use}
        if engine.prefix_cache is not None:
            body["prefix_cache"] = engine.prefix_cache.stats()
        return (503 if self.draining else 200), {**body, "queue_length": engine.queue_length}

    def serving(self) -> Backend:
        """The backend, if it can take a request now; else the 503 that says why not."""
        if self.draining:
            raise APIError(503, "The server is shutting down", code="shutting_down")
        code, body = self.health()
        if code != 200:
            message = {"loading": "The model is still loading; retry shortly"}.get(body["status"])
            raise APIError(
                503, message or f"The server cannot serve: {body.get('error')}", code=body["status"]
            )
        return self.backend

    def idle(self) -> bool:
        return self.backend is None or self.backend.engine.idle

    @property
    def engine_error(self) -> str | None:
        """Why the engine stopped for good (None while it runs, or before it exists)."""
        return None if self.backend is None else self.backend.engine.error


class Gate:
    """ASGI middleware: API key, body size, request counting; nothing reaches a handler past it unchecked."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500
        started = False

        async def counted_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await errors.error_response(refusal)(scope, receive, counted_send)
                return
            await self.app(scope, self._limited(receive), counted_send)
        except ClientDisconnect:
            # The client left before its body arrived: nobody to answer, and not the server's fault.
            status = CLIENT_CLOSED
            logger.info("%s %s: the client disconnected before sending its whole body", scope["method"], path)
        except Exception as exc:
            # A bug: answered here with the OpenAI body rather than re-raised to uvicorn, which would
            # close the keep-alive connection and so break the client's next request too.
            logger.exception("unexpected error on %s %s", scope["method"], path)
            if not started:
                error = APIError(500, f"Internal server error: {type(exc).__name__}")
                await errors.error_response(error)(scope, receive, counted_send)
        finally:
            self.state.metrics.request(path if path in _ENDPOINTS else "other", status)

    def _refusal(self, scope: Scope) -> APIError | None:
        settings = self.state.settings
        headers = {k.lower(): v for k, v in scope["headers"]}
        if settings.api_key is not None and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not _same_secret(token.strip(), settings.api_key):
                return APIError(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                    type="invalid_request_error",
                    code="invalid_api_key",
                )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return self._too_large(length.decode("latin-1"))
        return None

    def _too_large(self, size: str | int) -> APIError:
        limit = self.state.settings.max_body_bytes
        return APIError(
            413,
            f"The request body ({size} bytes) is larger than the limit of {limit} bytes",
            code="body_too_large",
        )

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that counts body bytes and raises 413 past the limit (bodies without Content-Length)."""
        received = 0
        limit = self.state.settings.max_body_bytes

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large(f"over {received}")
            return message

        return limited


def _same_secret(given: bytes, key: str) -> bool:
    """Whether the header's bytes are the key's UTF-8, in constant time: both are hashed first, so
    neither the comparison's time nor its length check tells anything about the key's length."""
    digest = hashlib.sha256
    return hmac.compare_digest(digest(given).digest(), digest(key.encode("utf-8")).digest())


class EventStream(StreamingResponse):
    """Server-sent events whose job is closed however the response ends: finished, failed, or the
    client gone (Starlette cancels the stream then), so a disconnect frees its slots."""

    def __init__(self, chunks: AsyncIterator[str], job: Job) -> None:
        super().__init__(
            chunks,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _invalid_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """(path, what) of the first string in parsed JSON that is not valid Unicode, or None; path is
    "" for the body itself ("messages[0].content", "prompt[1]", ...).

    JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer (and no UTF-8 encoder) takes.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, f"a lone surrogate {value[exc.start]!r} at character {exc.start}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            bad_key = _invalid_text(key, path)
            if bad_key is not None:
                return path, f"a key holds {bad_key[1]}"
            found = _invalid_text(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _invalid_text(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    raw = await request.body()  # the Gate enforces the size limit while this reads
    if not raw.strip():
        raise APIError(400, "The request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(
            400, f"The request body must be a JSON object, got {_KINDS.get(type(data), 'something else')}"
        )
    try:
        bad = _invalid_text(data)
    except RecursionError:  # json.loads nests deeper than this walk can follow
        raise APIError(400, "The request body nests too deeply", code="invalid_json") from None
    if bad is not None:
        path, what = bad
        where = f"at '{path}'" if path else "in the body"
        raise APIError(
            400,
            f"The request body holds text that is not valid Unicode {where}: {what}",
            param=path.split(".")[0].split("[")[0] or None,
            code="invalid_unicode",
        )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise errors.from_validation(exc.errors()) from exc


def _check_model(backend: Backend, model: str | None) -> None:
    if model is not None and model != backend.model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{backend.model_name}'",
            param="model",
            code="model_not_found",
        )


async def _close_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away (the body is read: what comes next is the disconnect), then cancel."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.close()
            return


Whole = Callable[[Job, Plan, Tokenizer, str], Awaitable[dict]]
Chunks = Callable[[Job, Plan, Tokenizer, str], AsyncIterator[str]]


async def _serve(
    request: Request, backend: Backend, mailbox: Mailbox, plan: Plan, whole: Whole, chunks: Chunks
) -> Response:
    job = Job(backend.engine, backend.tokenizer, plan, backend.stop_tokens, mailbox)
    job.submit()
    if plan.stream:
        return EventStream(chunks(job, plan, backend.tokenizer, backend.model_name), job)
    watcher = asyncio.create_task(_close_on_disconnect(request, job))
    try:
        body = await whole(job, plan, backend.tokenizer, backend.model_name)
    finally:
        watcher.cancel()
        job.close()
    return JSONResponse(body)


def create_app(source: Backend | Callable[[], Backend], settings: Settings | None = None) -> FastAPI:
    """The app serving `source`: a ready Backend, or a function that loads one (run in a thread at
    startup, while /health says "loading")."""
    settings = settings or Settings()
    state = ServerState(settings, Metrics())

    def load(mailbox: Mailbox) -> None:
        try:
            state.attach(source(), mailbox)
        except Exception as exc:
            logger.exception("loading the model failed")
            state.load_error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mailbox = Mailbox(asyncio.get_running_loop())
        if isinstance(source, Backend):
            state.attach(source, mailbox)
        else:
            threading.Thread(target=load, args=(mailbox,), name="pyjamba-load", daemon=True).start()
        yield
        state.draining = True
        if state.backend is not None:
            await run_in_threadpool(state.backend.engine.stop, 10.0)

    app = FastAPI(title="pyjamba", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    errors.install(app)
    app.add_middleware(Gate, state=state)
    if settings.cors_origins:  # added last: outermost, so preflight requests never meet the API key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    def limits(backend: Backend) -> Limits:
        return Limits(
            max_context=backend.engine.max_context,
            vocab_size=backend.engine.vocab_size,
            max_n=settings.max_n,
            max_logprobs=settings.max_logprobs,
            max_sequences=backend.engine.max_queue,
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        code, body = state.health()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        backend = state.serving()
        card = ModelCard(
            id=backend.model_name, created=backend.created, max_model_len=backend.engine.max_context
        )
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        backend = state.serving()
        req = await _parse(request, CompletionRequest)
        _check_model(backend, req.model)
        # Tokenizing a long prompt takes a while: off the event loop.
        plan = await run_in_threadpool(
            completion_plan, req, backend.tokenizer, limits(backend), backend.defaults
        )
        return await _serve(request, backend, state.mailbox, plan, completion, completion_chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        backend = state.serving()
        req = await _parse(request, ChatCompletionRequest)
        _check_model(backend, req.model)
        plan = await run_in_threadpool(chat_plan, req, backend.tokenizer, limits(backend), backend.defaults)
        return await _serve(request, backend, state.mailbox, plan, chat_completion, chat_chunks)

    return app
