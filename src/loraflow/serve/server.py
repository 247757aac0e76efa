"""`Server`: a LoraFlowModel, its tokenizer, the served names and the engine thread, behind one app.

    server = Server.from_pretrained("base", adapters={"zh": "lora-zh", "math": "lora-math"},
                                    gates={"zh-math": "gate_dir"}, fusions={"mix": "avg"})
    server.run()                          # blocking; Ctrl-C stops it
    with server.running() as url: ...     # in a background thread (tests, notebooks)
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from loraflow.common.errors import LoraFlowError
from loraflow.serve.config import ServeConfig
from loraflow.serve.metrics import Metrics
from loraflow.serve.registry import ServedModels
from loraflow.serve.schemas import APIError

MAX_DEFAULT_LEN = 32768
GRACEFUL_SHUTDOWN_S = 5


class Server:
    """An OpenAI-compatible server over one LoraFlowModel where every request picks its own fusion.

    Args:
        model: a LoraFlowModel (in eval mode, on its device).
        tokenizer: its tokenizer (chat requests need a chat template).
        served: the served names (see `ServedModels.build`).
        config: listening and batching settings.
    """

    def __init__(self, model, tokenizer, served: ServedModels, config: ServeConfig | None = None) -> None:
        from loraflow.serve.app import create_app
        from loraflow.serve.batching import check_cache_support
        from loraflow.serve.engine import Engine

        self.config = config or ServeConfig()
        check_cache_support(model)
        self.model = model.eval()
        if self.config.compile and not getattr(model, "compiled", False):
            model.compile(dynamic=True)  # dynamic shapes: batch sizes and cache widths change every step
        self.tokenizer = tokenizer
        self.served = served
        self.max_model_len = self.config.max_model_len or _model_length(model)
        self.metrics = Metrics()
        self.engine = Engine(model, tokenizer, max_batch_size=self.config.max_batch_size,
                             max_queue=self.config.max_queue, max_model_len=self.max_model_len,
                             prefill_chunk=self.config.prefill_chunk, seed=self.config.seed, metrics=self.metrics)
        self._tokenizer_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        self.app = create_app(self)

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, adapters: Mapping[str, str | os.PathLike], *,
                        gates: Mapping[str, str | os.PathLike] | None = None,
                        fusions: Mapping[str, str] | None = None, config: ServeConfig | None = None,
                        device: str = "auto", dtype: str | None = None) -> Server:
        """Load the base, the adapters and every named gate, and serve them.

        Args:
            base: a transformers model directory (with its tokenizer).
            adapters: {name: PEFT LoRA directory}, in the gates' adapter order.
            gates: {served name: loraflow gate directory or official .pt file}.
            fusions: {served name: fusion spec}, e.g. {"mix": "avg", "zh70": "static:0.7,0.3"}.
            device: auto, cpu or cuda[:N]; dtype: auto, float32, bfloat16, float16 or None (checkpoint's).

        Raises:
            LoraFlowError: a bad path, name or spec (checked before the model is loaded where possible).
        """
        config = config or ServeConfig()
        gates = dict(gates or {})
        served = ServedModels.build(base_name=config.served_model_name or Path(base).name or str(base),
                                    adapter_names=list(adapters), gate_names=list(gates), presets=fusions)
        for name, path in gates.items():
            if not Path(path).exists():
                raise LoraFlowError(f"--gate {name}={path}: not found")

        import torch

        from loraflow.core.devices import resolve_device, resolve_dtype
        from loraflow.core.model import LoraFlowModel, load_tokenizer

        device = resolve_device(device)
        tokenizer = load_tokenizer(base)
        named = list(gates.items())
        first_name, first_path = named[0] if named else ("default", None)  # no gates: a fresh one, never served
        model = LoraFlowModel.from_pretrained(base, dict(adapters), first_path, gate_name=first_name,
                                              torch_dtype=resolve_dtype(dtype, device), device=device,
                                              seed=config.seed)
        for name, path in named[1:]:
            model.add_gate(name, path)
        torch.manual_seed(config.seed)
        return cls(model, tokenizer, served, config)

    # ----------------------------------------------------------------- prompts
    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat exactly as `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`
        gives them (a default system prompt the template injects included), as other servers render it and as
        the `chat` template of training does."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions with a plain "
                                "prompt, or serve a base model whose tokenizer_config.json has a chat_template",
                           param="messages")
        try:
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as e:  # jinja errors raised by the template itself (e.g. "roles must alternate")
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None

    def text_prompt(self, prompt: str | list) -> list[int]:
        """Token ids of a completion prompt: a string (tokenized with special tokens) or token ids."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            with self._tokenizer_lock:
                return self.tokenizer(prompt)["input_ids"]
        vocab = self.model.config.get_text_config().vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
        return list(prompt)

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (special tokens kept), as an echoed token-id prompt reads."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids)

    def token_text(self, token: int) -> str:
        """One token's own text, as log-probs name it (cached: top-N lists repeat tokens)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.decode([token])
        return text

    def token_budget(self, prompt_len: int, requested: int | None, default: int | None) -> int:
        """max_tokens for a request, or a 400 when the prompt (plus what was asked) does not fit."""
        limit = self.max_model_len
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_len >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has "
                                f"{prompt_len} tokens, leaving no room for a completion", code="context_length_exceeded")
        room = limit - prompt_len
        if requested is not None and requested > room:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; you requested "
                                f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} for the completion)",
                           param="max_tokens", code="context_length_exceeded")
        if requested is not None:
            return requested
        return min(default, room) if default is not None else room

    # ----------------------------------------------------------------- running
    def run(self, *, log_level: str = "warning", out=None) -> None:
        """Listen on config.host:config.port until Ctrl-C (or SIGTERM); print where and what is served."""
        out = out or sys.stdout
        sock = bind(self.config.host, self.config.port)
        server = _uvicorn(self.app, self.engine, log_level)
        print(f"loraflow serve: listening on {url_of(sock)} (OpenAI API under /v1; Ctrl-C stops)", file=out)
        weights = next(self.engine.model.parameters(), None)
        if weights is not None:
            print(f"  weights in {str(weights.dtype).removeprefix('torch.')} on {weights.device}", file=out)
        for m in self.served:
            print(f"  model {m.name!r}: {m.kind}, fusion {m.fusion}", file=out)
        out.flush()
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after its graceful shutdown
            pass
        finally:
            sock.close()
            self.engine.stop()
        print("loraflow serve: stopped", file=out)

    @contextlib.contextmanager
    def running(self, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0) -> Iterator[str]:
        """Serve in a background thread; yields the base URL (http://host:port) and stops on exit."""
        import asyncio
        import time

        sock = bind(host, port)
        server = _uvicorn(self.app, self.engine, "warning")
        server.install_signal_handlers = lambda: None  # only the main thread may; the caller owns signals
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                  name="loraflow-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            server.should_exit = True
            raise LoraFlowError(f"the server did not start within {timeout} s")
        try:
            yield url_of(sock)
        finally:
            self.engine.request_stop()  # open streams end now instead of holding up the shutdown
            server.should_exit = True
            thread.join(timeout + GRACEFUL_SHUTDOWN_S)
            sock.close()
            self.engine.stop()


def _uvicorn(app, engine, log_level: str):
    """A uvicorn server whose Ctrl-C / SIGTERM first stops the engine, so open streams end at once."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.request_stop()
            super().handle_exit(sig, frame)

    return _Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a clear error when that fails."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise LoraFlowError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _model_length(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(min(n, MAX_DEFAULT_LEN)) if n else 2048
