"""loraflow: LoRA-Flow dynamic fusion of LoRA adapters for Hugging Face causal LMs.

Heavy dependencies (torch, transformers) are imported lazily, so `import loraflow` and the
CLI's help stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LoraFlowModel": "loraflow.core.model",
    "FusionGate": "loraflow.core.gate",
    "GateConfig": "loraflow.core.gate",
    "FusedLoraLinear": "loraflow.core.fused_linear",
    "LoraFlowError": "loraflow.common.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from loraflow.common.errors import LoraFlowError
    from loraflow.core.fused_linear import FusedLoraLinear
    from loraflow.core.gate import FusionGate, GateConfig
    from loraflow.core.model import LoraFlowModel


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraflow' has no attribute {name!r}")
