"""`loraflow serve --engine vllm`: vLLM's own OpenAI server runs the model (with the loraflow plugin), and a
thin proxy in front of it keeps loraflow's served names and `fusion` field.

    client --(model: "zh-math", fusion: ...)--> proxy --(model: INTERNAL, vllm_xargs.fusion, cache_salt)--> vLLM

The proxy resolves a request's `model` and `fusion` exactly as the default engine does
(`loraflow.serve.registry.ServedModels`), writes the canonical fusion into `vllm_xargs` (which vLLM hands
to the model as SamplingParams.extra_args) and sets `cache_salt` from it on every request, so prefix
caching never shares KV blocks between fusions. Everything else (logprobs, n, penalties, structured
output, streaming) is vLLM's own API, passed through untouched. vLLM runs in its own process, from the
Python that has it (`--vllm-python`; vLLM pins its own torch and transformers), on a Unix socket in a
private directory and with a key of the proxy's own, so that only the proxy reaches it.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraflow.common.errors import LoraFlowError
from loraflow.serve.registry import ServedModels, UnknownModel
from loraflow.serve.schemas import APIError
from loraflow.vllm.routing import FUSION_KEY, fusion_salt
from loraflow.vllm.versions import INSTALL_HINT

INTERNAL_NAME = "loraflow-fused"  # the one model vLLM serves; clients never see it
GENERATION_ROUTES = ("v1/completions", "v1/chat/completions")


def find_vllm_python(explicit: str | None = None) -> str:
    """The Python interpreter that runs vLLM: `explicit`, $LORAFLOW_VLLM_PYTHON, or this one if it has vLLM.

    Raises:
        LoraFlowError: (one line, exit 2) no interpreter with vLLM, saying what to install.
    """
    if importlib.util.find_spec("httpx") is None:
        raise LoraFlowError(f"--engine vllm needs httpx for its proxy, which is not installed here: {INSTALL_HINT}")
    chosen = explicit or os.environ.get("LORAFLOW_VLLM_PYTHON")
    if chosen:
        if not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
            raise LoraFlowError(f"{chosen}: --vllm-python is not an executable Python interpreter")
        return str(chosen)
    if importlib.util.find_spec("vllm") is None:
        raise LoraFlowError(f"--engine vllm needs vLLM, which is not installed here: {INSTALL_HINT}, "
                            "or pass --vllm-python PATH (a Python that has vLLM and loraflow)")
    return sys.executable


def rewrite_request(body: object, served: ServedModels) -> tuple[dict, str]:
    """The body vLLM gets for a client's generation request, and the model name the client used.

    Raises:
        UnknownModel: the model is not served (404). LoraFlowError: a bad `fusion` or body (400).
    """
    if not isinstance(body, dict):
        raise LoraFlowError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise LoraFlowError("model: required, a served model name")
    body = dict(body)
    spec = str(served.resolve(model, body.pop("fusion", None)))
    xargs = body.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise LoraFlowError("vllm_xargs: expected an object")
    client_salt = body.get("cache_salt")
    body["vllm_xargs"] = {**xargs, FUSION_KEY: spec}
    body["cache_salt"] = fusion_salt(spec if client_salt is None else f"{spec}\x00{client_salt}")
    body["model"] = INTERNAL_NAME
    return body, model


def rename_model(data: bytes, name: str) -> bytes:
    """vLLM's JSON (a body or one server-sent event) with its internal model name replaced by the client's."""
    new = json.dumps(name).encode()
    for sep in (b":", b": "):
        data = data.replace(b'"model"' + sep + json.dumps(INTERNAL_NAME).encode(), b'"model"' + sep + new)
    return data


# Headers that describe one hop (or that httpx sets itself), never forwarded either way.
_HOP_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                          "trailer", "upgrade", "proxy-authorization", "proxy-authenticate", "authorization"})
# POST routes passed through as they are: they take a prompt but generate nothing, so no fusion applies.
PASSTHROUGH_POST_ROUTES = ("tokenize", "detokenize")


def _error(status: int, message: str, **kwargs) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status,
                                                                     "server_error" if status >= 500 else None)
    return JSONResponse(APIError(status, message, **({"type": kind} if kind else {}), **kwargs).body(),
                        status_code=status)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _forwarded_headers(request: Request, internal_key: str | None) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    if internal_key:
        headers["authorization"] = f"Bearer {internal_key}"
    return headers


def _reply_headers(upstream_response) -> dict[str, str]:
    return {k: v for k, v in upstream_response.headers.items()
            if k.lower() not in _HOP_HEADERS and k.lower() not in ("content-encoding", "content-type")}


def create_proxy_app(upstream: str, served: ServedModels, *, internal_key: str | None = None,
                     client_key: str | None = None, max_connections: int = 100, transport=None):
    """The proxy's ASGI app, forwarding to vLLM's server at `upstream` (e.g. http://127.0.0.1:8123).

    Args:
        internal_key: the key vLLM's server was started with (`--api-key`); the proxy sends it, so vLLM
            answers only the proxy. client_key: the key clients must send (the user's `--api-key`), if any.
        max_connections: the connection pool towards vLLM (the server's batch plus its queue).
        transport: an httpx transport (tests).
    """
    import asyncio

    import httpx

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(None, connect=10.0), limits=limits,
                               transport=transport)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(title="loraflow (vLLM engine)", lifespan=lifespan)
    created = int(time.time())

    if client_key:
        app.add_middleware(_RequireKey, key=client_key)

    async def forward(method: str, route: str, request: Request, content: bytes | None = None, json_body=None):
        """Send one request to vLLM; an unreachable vLLM is a 502 in OpenAI's error shape."""
        built = client.build_request(method, f"/{route}", params=request.query_params, content=content,
                                     json=json_body, headers=_forwarded_headers(request, internal_key))
        try:
            return await client.send(built, stream=True)
        except httpx.HTTPError as e:
            raise _Unreachable(f"vLLM's server did not answer ({type(e).__name__})") from None

    async def whole(upstream_response, request: Request, name: str | None) -> Response:
        """vLLM's whole answer; a client that goes away meanwhile aborts it (vLLM stops generating)."""
        reading = asyncio.ensure_future(upstream_response.aread())
        try:
            while not reading.done():
                await asyncio.wait({reading}, timeout=0.5)
                if not reading.done() and await request.is_disconnected():
                    reading.cancel()
                    return Response(status_code=499)
            content = reading.result()
        finally:
            await upstream_response.aclose()
        if name is not None:
            content = rename_model(content, name)
        return Response(content, upstream_response.status_code, headers=_reply_headers(upstream_response),
                        media_type=upstream_response.headers.get("content-type"))

    @app.exception_handler(_Unreachable)
    async def unreachable(request: Request, exc: _Unreachable) -> JSONResponse:
        return _error(502, str(exc))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "loraflow", "fusion": str(m.fusion)}
            for m in served]})

    @app.get("/v1/models/{name}")
    async def model(name: str) -> JSONResponse:
        found = served.models.get(name)
        if found is None:
            return _error(404, f"the model '{name}' does not exist", code="model_not_found")
        return JSONResponse({"id": name, "object": "model", "created": created, "owned_by": "loraflow",
                             "fusion": str(found.fusion)})

    @app.post("/{route:path}")
    async def generate(route: str, request: Request) -> Response:
        raw = await request.body()
        if route in PASSTHROUGH_POST_ROUTES:
            return await whole(await forward("POST", route, request, content=raw), request, None)
        if route not in GENERATION_ROUTES:
            return _error(404, f"/{route} is not served here: the vLLM engine serves generation on "
                               f"{', '.join('/' + r for r in GENERATION_ROUTES)} (where each request's fusion is "
                               f"checked), and {', '.join('/' + r for r in PASSTHROUGH_POST_ROUTES)}")
        try:
            body, name = rewrite_request(json.loads(raw or b"null", parse_constant=_reject_constant), served)
        except UnknownModel as e:
            return _error(404, str(e), code="model_not_found")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"malformed JSON body: {e}")
        except (LoraFlowError, ValueError) as e:
            return _error(400, str(e), param="fusion" if "fusion" in str(e) else None)
        upstream_response = await forward("POST", route, request, json_body=body)
        if not body.get("stream") or upstream_response.status_code != 200:
            return await whole(upstream_response, request, name)

        async def relay():
            try:
                async for line in upstream_response.aiter_lines():
                    yield rename_model(line.encode(), name) + b"\n"
            finally:  # also when the client goes away: closing the stream makes vLLM abort the request
                await upstream_response.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream", headers=_reply_headers(upstream_response))

    @app.get("/{route:path}")
    async def passthrough(route: str, request: Request) -> Response:
        return await whole(await forward("GET", route, request), request, None)

    return app


class _RequireKey:
    """ASGI middleware: /v1 requests must carry `Authorization: Bearer KEY` (plain ASGI, so that a handler still
    sees its client disconnect)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            sent = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                await _error(401, "invalid or missing API key (send Authorization: Bearer KEY)")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Unreachable(Exception):
    """vLLM's server could not be reached (a 502 for the client)."""


def vllm_command(python: str, model_dir: Path, socket_path: Path, *, max_model_len: int | None, max_num_seqs: int,
                 seed: int, extra: Sequence[str] = ()) -> list[str]:
    """The command line of vLLM's OpenAI server for a prepared model directory, listening on a Unix socket."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", INTERNAL_NAME, "--uds", str(socket_path),
           "--max-num-seqs", str(max_num_seqs), "--seed", str(seed)]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + list(extra)


def split_api_key(vllm_args: Sequence[str]) -> tuple[list[str], str | None]:
    """vLLM's arguments without `--api-key KEY` (or `--api-key=KEY`), and that key: it is for clients, which
    the proxy checks; vLLM itself gets a key of the proxy's own."""
    rest, key, args = [], None, list(vllm_args)
    while args:
        arg = args.pop(0)
        if arg == "--api-key":
            if not args:
                raise LoraFlowError("--vllm-args: --api-key needs a value")
            key = args.pop(0)
        elif arg.startswith("--api-key="):
            key = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, key


def _wait_healthy(proc: subprocess.Popen, socket_path: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=2.0) as probe:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LoraFlowError(f"vLLM's server exited with code {proc.returncode} while starting (its log is above)")
            try:
                if probe.get("http://vllm/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise LoraFlowError(f"vLLM's server did not become healthy within {timeout:.0f} s")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so `finally` stops vLLM (uvicorn re-raises SIGTERM after its shutdown)


def _stop(proc: subprocess.Popen) -> None:
    """Stop vLLM's server and its engine process (its own process group), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve_with_vllm(opts, config, *, vllm_python: str | None = None, vllm_args: str = "",
                    model_dir: str | None = None, startup_timeout: float = 900.0) -> None:
    """Prepare the model directory, start vLLM's server with the plugin, and serve the proxy until stopped.

    Args:
        opts: ServeOptions (base, adapters, gates, fusion presets); config: ServeConfig (host, port, ...).
        vllm_python: the Python that runs vLLM (see `find_vllm_python`).
        vllm_args: extra arguments for vLLM's server, e.g. "--tensor-parallel-size 2".
        model_dir: where to write the prepared model directory (default: a temporary directory).
    """
    import uvicorn

    from loraflow.vllm.prepare import prepare_model_dir, vllm_dtype

    python = find_vllm_python(vllm_python)
    base_name = config.served_model_name or Path(opts.base).name
    served = ServedModels.build(base_name=base_name, adapter_names=list(opts.adapters), gate_names=list(opts.gates),
                                presets=opts.fusions)
    with contextlib.ExitStack() as stack:
        if model_dir is None:
            model_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraflow-vllm-"))) / "model"
        prepared = prepare_model_dir(model_dir, opts.base, opts.adapters, opts.gates,
                                     default_fusion="gate" if opts.gates else "off")
        # vLLM listens on a Unix socket in a directory only this user can enter, and wants a key of the proxy's
        # own: only the proxy, which checks every request's fusion, reaches it
        socket_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraflow-vllm-"))) / "vllm.sock"
        internal_key = secrets.token_urlsafe(32)
        args, client_key = split_api_key(shlex.split(vllm_args))
        client_key = client_key or os.environ.get("VLLM_API_KEY") or None
        dtype = vllm_dtype(opts.dtype, prepared)  # what the default engine would load for the same --dtype
        why = f"--dtype {opts.dtype}" if opts.dtype else "the checkpoint's dtype"
        print(f"loraflow serve (vLLM engine): loading {opts.base} in {dtype} ({why})", file=sys.stderr, flush=True)
        cmd = vllm_command(python, prepared, socket_path, max_model_len=config.max_model_len,
                           max_num_seqs=config.max_batch_size, seed=config.seed, extra=["--dtype", dtype, *args])
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        env = {**os.environ, "VLLM_API_KEY": internal_key}
        proc = subprocess.Popen(cmd, start_new_session=True, env=env)  # a group of its own: its engine stops too
        try:
            _wait_healthy(proc, socket_path, startup_timeout)
            print(f"loraflow serve (vLLM engine): http://{config.host}:{config.port}/v1 serving "
                  f"{', '.join(m.name for m in served)}" + (" (clients must send the API key)" if client_key else ""),
                  file=sys.stderr, flush=True)
            import httpx

            app = create_proxy_app("http://vllm", served, internal_key=internal_key, client_key=client_key,
                                   max_connections=config.max_batch_size + config.max_queue,
                                   transport=httpx.AsyncHTTPTransport(uds=str(socket_path)))
            uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
        finally:
            _stop(proc)
            signal.signal(signal.SIGTERM, previous)
