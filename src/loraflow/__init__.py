"""loraflow: LoRA-Flow dynamic fusion of LoRA adapters for Hugging Face causal LMs.

The public API is importable from here; each name is loaded from its package on first use, so
`import loraflow` and the CLI's help stay fast (no torch until a model is touched).

Packages, lowest layer first (a package imports only its own layer and lower ones):
common (errors, atomic IO, options, provenance) < data (formats, templates, protocol) < core
(the fusion engine) < evaluation < train < serve < demo < cli.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LoraFlowModel": "loraflow.core.model",
    "FusionGate": "loraflow.core.gate",
    "GateConfig": "loraflow.core.gate",
    "FusedLoraLinear": "loraflow.core.fused_linear",
    "FusionSpec": "loraflow.core.fusion_spec",
    "parse_fusion": "loraflow.core.fusion_spec",
    "load_tokenizer": "loraflow.core.model",
    "generate_texts": "loraflow.core.generation",
    "inspect_prompt": "loraflow.core.inspection",
    "convert_official_gate": "loraflow.core.checkpoints",
    "PromptTemplate": "loraflow.data.formats",
    "render_prompt": "loraflow.data.templates",
    "load_examples": "loraflow.data.formats",
    "TrainConfig": "loraflow.train.config",
    "GateTrainConfig": "loraflow.train.config",
    "LoraTrainConfig": "loraflow.train.config",
    "train_gate": "loraflow.train.training",
    "train_lora": "loraflow.train.training",
    "EvalConfig": "loraflow.evaluation.harness",
    "evaluate": "loraflow.evaluation.harness",
    "score_file": "loraflow.evaluation.scoring",
    "write_report": "loraflow.evaluation.report",
    "Server": "loraflow.serve.server",
    "ServeConfig": "loraflow.serve.config",
    "run_demo": "loraflow.demo.pipeline",
    "LoraFlowError": "loraflow.common.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from loraflow.common.errors import LoraFlowError
    from loraflow.core.checkpoints import convert_official_gate
    from loraflow.core.fused_linear import FusedLoraLinear
    from loraflow.core.fusion_spec import FusionSpec, parse_fusion
    from loraflow.core.gate import FusionGate, GateConfig
    from loraflow.core.generation import generate_texts
    from loraflow.core.inspection import inspect_prompt
    from loraflow.core.model import LoraFlowModel, load_tokenizer
    from loraflow.data.formats import PromptTemplate, load_examples
    from loraflow.data.templates import render_prompt
    from loraflow.demo.pipeline import run_demo
    from loraflow.evaluation.harness import EvalConfig, evaluate
    from loraflow.evaluation.report import write_report
    from loraflow.evaluation.scoring import score_file
    from loraflow.serve.config import ServeConfig
    from loraflow.serve.server import Server
    from loraflow.train.config import GateTrainConfig, LoraTrainConfig, TrainConfig
    from loraflow.train.training import train_gate, train_lora


# Names whose module needs an extra (loraflow.common.extras): what a missing one says.
_NEEDS = {"Server": ("serving", ("fastapi", "uvicorn", "prometheus_client"))}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        if name in _NEEDS:
            from loraflow.common.extras import require

            what, modules = _NEEDS[name]
            require(*modules, what=what)
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraflow' has no attribute {name!r}")
