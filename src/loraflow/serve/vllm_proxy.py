"""`loraflow serve --engine vllm`: vLLM's own OpenAI server runs the model (with the loraflow plugin), and a
thin proxy in front of it keeps loraflow's served names and `fusion` field.

    client --(model: "zh-math", fusion: ...)--> proxy --(model: INTERNAL, vllm_xargs.fusion, cache_salt)--> vLLM

The proxy resolves a request's `model` and `fusion` exactly as the default engine does
(`loraflow.serve.registry.ServedModels`), writes the canonical fusion into `vllm_xargs` (which vLLM hands
to the model as SamplingParams.extra_args) and sets `cache_salt` from it on every request, so prefix
caching never shares KV blocks between fusions. Everything else (logprobs, n, penalties, structured
output, streaming) is vLLM's own API, passed through untouched. vLLM runs in its own process, from the
Python that has it (`--vllm-python`; vLLM pins its own torch and transformers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import signal
import socket
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


def create_proxy_app(upstream: str, served: ServedModels):
    """The proxy's ASGI app, forwarding to vLLM's server at `upstream` (e.g. http://127.0.0.1:8123)."""
    import httpx

    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(None, connect=10.0))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(title="loraflow (vLLM engine)", lifespan=lifespan)
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "loraflow", "fusion": str(m.fusion)}
            for m in served]})

    @app.get("/v1/models/{name}")
    async def model(name: str) -> JSONResponse:
        found = served.models.get(name)
        if found is None:
            return JSONResponse(APIError(404, f"the model '{name}' does not exist", code="model_not_found").body(),
                                status_code=404)
        return JSONResponse({"id": name, "object": "model", "created": created, "owned_by": "loraflow",
                             "fusion": str(found.fusion)})

    @app.post("/{route:path}")
    async def generate(route: str, request: Request) -> Response:
        raw = await request.body()
        if route not in GENERATION_ROUTES:
            upstream_response = await client.post(f"/{route}", content=raw, headers={"content-type": "application/json"})
            return Response(upstream_response.content, upstream_response.status_code,
                            media_type=upstream_response.headers.get("content-type"))
        try:
            body, name = rewrite_request(json.loads(raw or b"null"), served)
        except UnknownModel as e:
            return JSONResponse(APIError(404, str(e), code="model_not_found").body(), status_code=404)
        except (LoraFlowError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return JSONResponse(APIError(400, str(e), param="fusion" if "fusion" in str(e) else None).body(),
                                status_code=400)
        request_upstream = client.build_request("POST", f"/{route}", json=body)
        upstream_response = await client.send(request_upstream, stream=True)
        if not body.get("stream") or upstream_response.status_code != 200:
            content = rename_model(await upstream_response.aread(), name)
            await upstream_response.aclose()
            return Response(content, upstream_response.status_code,
                            media_type=upstream_response.headers.get("content-type"))

        async def relay():
            try:
                async for line in upstream_response.aiter_lines():
                    yield rename_model(line.encode(), name) + b"\n"
            finally:
                await upstream_response.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream")

    @app.get("/{route:path}")
    async def passthrough(route: str, request: Request) -> Response:
        upstream_response = await client.get(f"/{route}", params=request.query_params)
        return Response(upstream_response.content, upstream_response.status_code,
                        media_type=upstream_response.headers.get("content-type"))

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(python: str, model_dir: Path, port: int, *, max_model_len: int | None, max_num_seqs: int,
                 seed: int, extra: Sequence[str] = ()) -> list[str]:
    """The command line of vLLM's OpenAI server for a prepared model directory."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", INTERNAL_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--seed", str(seed)]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + list(extra)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LoraFlowError(f"vLLM's server exited with code {proc.returncode} while starting (its log is above)")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
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
        port = _free_port()
        dtype = vllm_dtype(opts.dtype, prepared)  # what the default engine would load for the same --dtype
        why = f"--dtype {opts.dtype}" if opts.dtype else "the checkpoint's dtype"
        print(f"loraflow serve (vLLM engine): loading {opts.base} in {dtype} ({why})", file=sys.stderr, flush=True)
        extra = ["--dtype", dtype] + shlex.split(vllm_args)
        cmd = vllm_command(python, prepared, port, max_model_len=config.max_model_len,
                           max_num_seqs=config.max_batch_size, seed=config.seed, extra=extra)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        proc = subprocess.Popen(cmd, start_new_session=True)  # a group of its own: its engine process stops too
        try:
            upstream = f"http://127.0.0.1:{port}"
            _wait_healthy(proc, upstream, startup_timeout)
            print(f"loraflow serve (vLLM engine): http://{config.host}:{config.port}/v1 serving "
                  f"{', '.join(m.name for m in served)}", file=sys.stderr, flush=True)
            uvicorn.run(create_proxy_app(upstream, served), host=config.host, port=config.port, log_level="warning")
        finally:
            _stop(proc)
            signal.signal(signal.SIGTERM, previous)
