"""The FastAPI app: OpenAI-compatible routes over a `Server`'s engine.

    GET  /v1/models[/NAME]     the served names (each a fusion; see loraflow.serve.registry)
    POST /v1/chat/completions  chat, rendered by the tokenizer's chat template
    POST /v1/completions       plain prompts
    GET  /health               200 while the engine runs, 503 otherwise
    GET  /version              package versions, settings and served names (provenance)
    GET  /metrics              Prometheus text format

Handlers validate, tokenize and queue a request, then relay the engine's updates as one JSON body
or as server-sent events ending with `data: [DONE]`. Every error is OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraflow.common.errors import LoraFlowError
from loraflow.common.provenance import versions
from loraflow.serve.engine import GenerationRequest, Overloaded, SamplingParams, ShuttingDown, Update
from loraflow.serve.registry import UnknownModel
from loraflow.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily, as vLLM's _SAMPLING_EPS (logits / T would overflow)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the remaining context
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions")  # metric labels; others count as "other"


def create_app(server) -> FastAPI:
    """The ASGI app of `server` (a loraflow.serve.Server); its lifespan starts and stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="loraflow", summary="OpenAI-compatible LoRA-Flow server", lifespan=lifespan)
    app.add_middleware(_CountRequests, metrics=server.metrics)
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        if server.engine.running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "down"}, status_code=503)

    @app.get("/version")
    async def version() -> dict:
        """What is running: package versions, the server's settings and its served names."""
        return {"versions": versions(), "config": dataclasses.asdict(server.config),
                "max_model_len": server.max_model_len, "models": {m.name: str(m.fusion) for m in server.served}}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(m) -> dict:
        return {"id": m.name, "object": "model", "created": created, "owned_by": "loraflow", "root": m.name,
                "parent": None, "fusion": str(m.fusion), "kind": m.kind}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(m) for m in server.served]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        found = server.served.models.get(name)
        if found is None:
            raise APIError(404, f"the model '{name}' does not exist", type="not_found_error", param="model",
                           code="model_not_found")
        return card(found)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        fusion = _resolve(server, body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = server.chat_prompt(messages)
        job = _submit(server, body, ids, fusion, default_max_tokens=None)
        shape = _ChatShape(body.model, body.include_usage)
        if body.stream:
            return _sse(job, shape, server, "/v1/chat/completions")
        return await _collect(job, shape, request, server, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        fusion = _resolve(server, body)
        ids = server.text_prompt(body.prompt)
        job = _submit(server, body, ids, fusion, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        shape = _CompletionShape(body.model, body.include_usage)
        if body.stream:
            return _sse(job, shape, server, "/v1/completions")
        return await _collect(job, shape, request, server, "/v1/completions")

    return app


# --------------------------------------------------------------------------- requests
class _Job:
    """A queued request and the asyncio queue its updates arrive on."""

    def __init__(self, request: GenerationRequest, updates: asyncio.Queue) -> None:
        self.request, self.updates = request, updates
        self.prompt_tokens = len(request.prompt_ids)
        self.started = time.monotonic()

    async def updates_until_done(self) -> AsyncIterator[Update]:
        while True:
            update = await self.updates.get()
            yield update
            if update.finish_reason is not None:
                return


def _resolve(server, body):
    try:
        return server.served.resolve(body.model, body.fusion)
    except UnknownModel as e:
        raise APIError(404, str(e), type="not_found_error", param="model", code="model_not_found") from None
    except LoraFlowError as e:
        raise APIError(400, str(e), param="fusion") from None


def _submit(server, body, ids: list[int], fusion, *, default_max_tokens: int | None) -> _Job:
    params = SamplingParams(
        max_tokens=server.token_budget(len(ids), body.token_limit, default_max_tokens),
        temperature=1.0 if body.temperature is None else 0.0 if body.temperature < GREEDY_BELOW else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed, stop=body.stops, ignore_eos=body.ignore_eos,
    )
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    request = GenerationRequest(ids, fusion, params, emit=lambda u: loop.call_soon_threadsafe(updates.put_nowait, u),
                                id=uuid.uuid4().hex)
    try:
        server.engine.submit(request)
    except ShuttingDown as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    except Overloaded as e:
        raise APIError(429, str(e), type="rate_limit_error", code="server_overloaded") from None
    return _Job(request, updates)


async def _collect(job: _Job, shape, request: Request, server, endpoint: str) -> Response:
    """Wait for the whole completion; a client that disconnects meanwhile cancels its request."""
    text, last = [], None
    disconnected = asyncio.ensure_future(_wait_disconnect(request))
    try:
        async for update in _until_disconnect(job, disconnected):
            text.append(update.text)
            last = update
    finally:
        disconnected.cancel()
        job.request.cancel()  # a no-op once finished; frees the row if the client left
    server.metrics.latency.labels(endpoint).observe(time.monotonic() - job.started)
    if last is None:
        return Response(status_code=499)  # nobody is listening
    if last.finish_reason in ("error", "cancelled"):
        raise APIError(503 if last.finish_reason == "cancelled" else 500,
                       last.error or "the server is shutting down", type="server_error")
    return JSONResponse(shape.whole("".join(text), last.finish_reason, _usage(job, last)))


async def _until_disconnect(job: _Job, disconnected: asyncio.Future) -> AsyncIterator[Update]:
    while True:
        getter = asyncio.ensure_future(job.updates.get())
        done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            return
        update = getter.result()
        yield update
        if update.finish_reason is not None:
            return


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(job: _Job, shape, server, endpoint: str) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            first = shape.first_chunk()
            if first is not None:
                yield _event(first)
            async for update in job.updates_until_done():
                if update.finish_reason in ("error", "cancelled"):
                    message = update.error or "the server is shutting down"
                    yield _event(APIError(500, message, type="server_error").body())
                    break
                if update.text:
                    yield _event(shape.chunk(update.text, None))
                if update.finish_reason is not None:
                    yield _event(shape.chunk("", update.finish_reason))
                    if shape.include_usage:
                        yield _event(shape.usage_chunk(_usage(job, update)))
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects and the response is torn down
            job.request.cancel()
            server.metrics.latency.labels(endpoint).observe(time.monotonic() - job.started)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(job: _Job, last: Update) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": job.prompt_tokens + last.completion_tokens}


# --------------------------------------------------------------------------- response shapes
class _Shape:
    def __init__(self, model: str, include_usage: bool) -> None:
        self.model, self.include_usage = model, include_usage
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def first_chunk(self) -> dict | None:
        return None


class _ChatShape(_Shape):
    prefix = "chatcmpl"

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage}

    def first_chunk(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return self._chunk({"content": text} if text else {}, finish_reason)

    def _chunk(self, delta: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}


class _CompletionShape(_Shape):
    prefix = "cmpl"

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("text_completion"), "choices": [], "usage": usage}


# --------------------------------------------------------------------------- errors and metrics
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            err = APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
        else:
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            where = ".".join(loc)
            err = APIError(400, f"{where}: {msg}" if where and not msg.startswith(where) else msg,
                           param=where or None)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)


class _CountRequests:
    """ASGI middleware counting API requests by endpoint and status (streams count when they end)."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status, counted = 500, False
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.requests.labels(endpoint, str(status)).inc()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()  # before the last byte goes out: a client that then reads /metrics finds its request
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            count()
