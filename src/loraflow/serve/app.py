"""The FastAPI app: OpenAI-compatible routes over a `Server`'s engine.

    GET  /v1/models[/NAME]     the served names (each a fusion; see loraflow.serve.registry)
    POST /v1/chat/completions  chat, rendered by the tokenizer's chat template
    POST /v1/completions       prompts (text, token ids, or a batch), with log-probs and echo
    GET  /health               200 while the engine runs, 503 otherwise
    GET  /version              package versions, settings and served names (provenance)
    GET  /metrics              Prometheus text format

Handlers validate, tokenize and queue a request (one engine row per prompt and sample), then relay
the engine's updates as one JSON body or as server-sent events ending with `data: [DONE]`. Every error is OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import logging
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
from loraflow.serve.schemas import SEED_MAX, APIError, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

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
        job = _submit(server, body, [ids], fusion, default_max_tokens=None, logprobs=body.top_logprobs_count)
        shape = _ChatShape(body.model, body.include_usage, server)
        if body.stream:
            return _sse(job, shape, server, "/v1/chat/completions")
        return await _collect(job, shape, request, server, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        fusion = _resolve(server, body)
        prompts = body.prompts
        ids = [server.text_prompt(p) for p in prompts]
        echo = [(p if isinstance(p, str) else server.decode(p)) if body.echo else "" for p in prompts]
        job = _submit(server, body, ids, fusion, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
                      logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None)
        shape = _CompletionShape(body.model, body.include_usage, server, echo=echo, logprobs=body.logprobs)
        if body.stream:
            return _sse(job, shape, server, "/v1/completions")
        return await _collect(job, shape, request, server, "/v1/completions")

    return app


# --------------------------------------------------------------------------- requests
class _Job:
    """The engine requests of one HTTP request (one per choice) and the queue their updates arrive on.

    Choice i is prompt i // n, sample i % n (OpenAI's order for a batch of prompts with n > 1).
    """

    def __init__(self, requests: list[GenerationRequest], prompts: list[list[int]], n: int,
                 updates: asyncio.Queue) -> None:
        self.requests, self.prompts, self.n, self.updates = requests, prompts, n, updates
        self.prompt_tokens = sum(len(p) for p in prompts)  # each prompt once, as OpenAI counts it
        self.started = time.monotonic()

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()  # a no-op once finished; frees the rows of a client that left

    async def updates_until_done(self, disconnected: asyncio.Future | None = None) -> AsyncIterator[tuple[int, Update]]:
        """(choice index, update) until every choice finished, or until the client went away."""
        open_ = len(self.requests)
        while open_:
            getter = asyncio.ensure_future(self.updates.get())
            waiting = {getter} if disconnected is None else {getter, disconnected}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            index, update = getter.result()
            yield index, update
            if update.finish_reason is not None:
                open_ -= 1


def _resolve(server, body):
    try:
        return server.served.resolve(body.model, body.fusion)
    except UnknownModel as e:
        raise APIError(404, str(e), type="not_found_error", param="model", code="model_not_found") from None
    except LoraFlowError as e:
        raise APIError(400, str(e), param="fusion") from None


def _submit(server, body, prompts: list[list[int]], fusion, *, default_max_tokens: int | None,
            logprobs: int | None = None, prompt_logprobs: int | None = None) -> _Job:
    """Queue one engine request per choice (each prompt n times); all or none of them."""
    choices = len(prompts) * body.n
    if choices > server.engine.max_queue:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} is {choices} choices; this server queues at "
                            f"most {server.engine.max_queue} (--max-queue)", param="n")
    budgets = [server.token_budget(len(ids), body.token_limit, default_max_tokens) for ids in prompts]
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    requests = []
    for index in range(choices):
        params = SamplingParams(
            max_tokens=budgets[index // body.n],
            temperature=1.0 if body.temperature is None else 0.0 if body.temperature < GREEDY_BELOW else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=_seed(body.seed, index % body.n), stop=body.stops, ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        )
        requests.append(GenerationRequest(
            prompts[index // body.n], fusion, params, id=uuid.uuid4().hex, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            emit=lambda u, i=index: loop.call_soon_threadsafe(updates.put_nowait, (i, u))))
    job = _Job(requests, prompts, body.n, updates)
    try:
        for request in requests:
            server.engine.submit(request)
    except ShuttingDown as e:
        job.cancel()
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    except Overloaded as e:
        job.cancel()
        raise APIError(429, str(e), type="rate_limit_error", code="server_overloaded") from None
    return job


def _seed(seed: int | None, sample: int) -> int | None:
    """Sample j of a seeded request uses seed + j (seed - j past the range), so the n samples differ."""
    if seed is None:
        return None
    return seed + sample if seed + sample <= SEED_MAX else seed - sample


@dataclasses.dataclass
class _Choice:
    """One choice as the updates build it up."""

    index: int
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None
    last: Update | None = None
    sent: int = 0  # characters streamed


async def _collect(job: _Job, shape, request: Request, server, endpoint: str) -> Response:
    """Wait for every choice; a client that disconnects meanwhile cancels its requests."""
    choices = [_Choice(i) for i in range(len(job.requests))]
    disconnected = asyncio.ensure_future(_wait_disconnect(request))
    try:
        async for index, update in job.updates_until_done(disconnected):
            choice = choices[index]
            choice.text.append(update.text)
            choice.logprobs.extend(update.logprobs or ())
            if update.prompt_logprobs is not None:
                choice.prompt_logprobs = update.prompt_logprobs
            choice.last = update
            if update.finish_reason in ("error", "cancelled"):
                break
    finally:
        disconnected.cancel()
        job.cancel()
    server.metrics.latency.labels(endpoint).observe(time.monotonic() - job.started)
    failed = [c.last for c in choices if c.last is not None and c.last.finish_reason in ("error", "cancelled")]
    if failed:
        raise APIError(503 if failed[0].finish_reason == "cancelled" else 500,
                       failed[0].error or "the server is shutting down", type="server_error")
    if any(c.last is None or c.last.finish_reason is None for c in choices):
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(shape.whole(job, choices, _usage(job, choices)))


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(job: _Job, shape, server, endpoint: str) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            for index in range(len(job.requests)):
                first = shape.first_chunk(index)
                if first is not None:
                    yield _event(first)
            choices = [_Choice(i) for i in range(len(job.requests))]
            async for index, update in job.updates_until_done():
                if update.finish_reason in ("error", "cancelled"):
                    message = update.error or "the server is shutting down"
                    yield _event(APIError(500, message, type="server_error").body())
                    break
                choice = choices[index]
                chunk = shape.chunk(job, choice, update)
                choice.last = update
                if chunk is not None:
                    yield _event(chunk)
                if update.finish_reason is not None:
                    yield _event(shape.finish_chunk(index, update.finish_reason))
            else:
                if shape.include_usage:
                    yield _event(shape.usage_chunk(_usage(job, choices)))
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects and the response is torn down
            job.cancel()
            server.metrics.latency.labels(endpoint).observe(time.monotonic() - job.started)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(job: _Job, choices: list[_Choice]) -> dict:
    completion = sum(c.last.completion_tokens for c in choices if c.last is not None)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


# --------------------------------------------------------------------------- response shapes
class _Shape:
    def __init__(self, model: str, include_usage: bool, server) -> None:
        self.model, self.include_usage, self.server = model, include_usage, server
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def first_chunk(self, index: int) -> dict | None:
        return None


class _ChatShape(_Shape):
    """chat.completion and chat.completion.chunk; log-probs as {"content": [{token, logprob, bytes,
    top_logprobs}]}."""

    prefix = "chatcmpl"

    def whole(self, job: _Job, choices: list[_Choice], usage: dict) -> dict:
        out = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": self._logprobs(job, c.logprobs), "finish_reason": c.last.finish_reason} for c in choices]
        return {**self._head("chat.completion"), "choices": out, "usage": usage}

    def first_chunk(self, index: int) -> dict:
        return self._chunk(index, {"role": "assistant", "content": ""}, None, None)

    def chunk(self, job: _Job, choice: _Choice, update: Update) -> dict | None:
        if not update.text and not update.logprobs:
            return None
        return self._chunk(choice.index, {"content": update.text} if update.text else {}, None,
                           self._logprobs(job, update.logprobs or []))

    def finish_chunk(self, index: int, finish_reason: str) -> dict:
        return self._chunk(index, {}, finish_reason, None)

    def _chunk(self, index: int, delta: dict, finish_reason: str | None, logprobs) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}

    def _logprobs(self, job: _Job, entries: list) -> dict | None:
        if job.requests[0].logprobs is None:
            return None
        tok = self.server.token_text

        def item(token: int, logprob: float) -> dict:
            text = tok(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}


class _CompletionShape(_Shape):
    """text_completion; log-probs as OpenAI's legacy {tokens, token_logprobs, top_logprobs, text_offset},
    the prompt's first (with echo) under it, its first token's log-prob null."""

    prefix = "cmpl"

    def __init__(self, model: str, include_usage: bool, server, *, echo: list[str], logprobs: int | None) -> None:
        super().__init__(model, include_usage, server)
        self.echo, self.top = echo, logprobs

    def whole(self, job: _Job, choices: list[_Choice], usage: dict) -> dict:
        out = []
        for c in choices:
            echo = self.echo[c.index // job.n]
            entries = list(c.logprobs)
            tokens = [e.token for e in entries]
            if echo and c.prompt_logprobs is not None:
                prompt = job.prompt_of(c.index)
                entries, tokens = list(c.prompt_logprobs) + entries, list(prompt) + tokens
            out.append({"index": c.index, "text": echo + "".join(c.text), "logprobs": self._logprobs(tokens, entries, 0),
                        "finish_reason": c.last.finish_reason})
        return {**self._head("text_completion"), "choices": out, "usage": usage}

    def chunk(self, job: _Job, choice: _Choice, update: Update) -> dict | None:
        echo = self.echo[choice.index // job.n] if choice.last is None else ""
        entries = list(update.logprobs or [])
        tokens = [e.token for e in entries]
        if echo and update.prompt_logprobs is not None:
            entries, tokens = list(update.prompt_logprobs) + entries, list(job.prompt_of(choice.index)) + tokens
        text = echo + update.text
        if not text and not entries:
            return None
        offset, choice.sent = choice.sent, choice.sent + len(text)
        return self._chunk(choice.index, text, None, self._logprobs(tokens, entries, offset))

    def finish_chunk(self, index: int, finish_reason: str) -> dict:
        return self._chunk(index, "", finish_reason, None)

    def _chunk(self, index: int, text: str, finish_reason: str | None, logprobs) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("text_completion"), "choices": [], "usage": usage}

    def _logprobs(self, tokens: list[int], entries: list, offset: int) -> dict | None:
        """OpenAI's legacy shape; top_logprobs holds the top N and the chosen token (up to N+1 entries),
        text_offset each token's start in the choice's text (summing the tokens' own texts, as vLLM)."""
        if self.top is None:
            return None
        tok = self.server.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, e in zip(tokens, entries):
            text = tok(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if e is None else e.logprob)
            out["top_logprobs"].append(None if e is None else {**{tok(t): lp for t, lp in e.top},
                                                                 text: e.logprob})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


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
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)  # the client gets no internals
        err = APIError(500, "internal error; the server's log has the details", type="server_error")
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
