"""`loraflow serve`: an OpenAI-compatible HTTP server where every request picks its own fusion.

Owns the served-name registry (which fusion a `model` name means), the request schemas, the engine
thread with continuous batching over per-row fusions, the FastAPI app and the `Server` that ties
them together. Imports common, data, core and evaluation; nothing above.

    from loraflow.serve import Server
    Server.from_pretrained("base", adapters={"zh": "lora-zh", "math": "lora-math"},
                           gates={"zh-math": "gates/zh_math"}).run()

Importing this package is cheap: the config and registry are pure Python; `Server` and
`create_app` (torch, FastAPI) load on first use.
"""

from __future__ import annotations

from loraflow.serve.config import ServeConfig
from loraflow.serve.registry import ServedModel, ServedModels

__all__ = ["ServeConfig", "ServedModel", "ServedModels", "Server", "create_app"]


def __getattr__(name: str):
    if name == "Server":
        from loraflow.serve.server import Server

        return Server
    if name == "create_app":
        from loraflow.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'loraflow.serve' has no attribute {name!r}")
