"""What a LoRA-Flow model directory names (adapters, gates, default fusion), loaded for the vLLM model.

No vLLM here: the adapters come from `loraflow.core.adapters`, the gates from `loraflow.core.checkpoints`
(our gate directories and the authors' `.pt` files), checked against the base model's shape. Gates are
stacked per layer as (G, k, d) weights, (G, k) biases and (G,) temperatures, fp32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from loraflow.common.errors import LoraFlowError
from loraflow.core.adapters import LoraAdapter, load_adapter
from loraflow.core.checkpoints import (is_official_gate_file, load_gate_checkpoint, load_official_gate,
                                       resolve_gate)
from loraflow.vllm.slicing import LoraPiece

SETTINGS_KEY = "loraflow"  # the config.json block
FORMAT_VERSION = 1
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>[a-z]+_proj)$")


@dataclass
class FusionAssets:
    """The adapters and stacked gates of one model."""

    adapters: list[LoraAdapter]
    gate_names: list[str]
    gate_weight: torch.Tensor  # (L, G, k, d) fp32
    gate_bias: torch.Tensor  # (L, G, k)
    gate_temperature: torch.Tensor  # (G,)
    default_fusion: str
    gate_top_k: torch.Tensor | None = None  # (G,) each gate's top-k; None when every gate keeps all k

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def pieces(self, layer: int, proj: str) -> list[LoraPiece | None]:
        """Per adapter, its (unsharded) LoRA on projection `proj` of decoder layer `layer`, or None."""
        found = []
        for adapter in self.adapters:
            module = next((m for name, m in adapter.modules.items() if _split(name) == (layer, proj)), None)
            found.append(None if module is None else LoraPiece(module.lora_A, module.lora_B, module.scale))
        return found


def _split(module: str) -> tuple[int, str] | None:
    m = _MODULE.match(module)
    return (int(m["layer"]), m["proj"]) if m and m["proj"] in PROJECTIONS else None


def check_adapter_targets(adapter: LoraAdapter, num_layers: int) -> None:
    """Refuse LoRAs on modules the vLLM model does not adapt (anything but q/k/v/o/gate/up/down of a layer)."""
    bad = [name for name in adapter.modules if _split(name) is None or _split(name)[0] >= num_layers]
    if bad:
        raise LoraFlowError(f"{adapter.path}: adapts modules the vLLM plugin cannot adapt ({', '.join(bad[:3])}"
                            f"{'...' if len(bad) > 3 else ''}); supported: {', '.join(PROJECTIONS)} of the decoder layers")


def load_gate_stack(path: str, adapter_names: Sequence[str], num_layers: int, hidden_size: int,
                    temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One gate as per-layer (L, k, d) weights and (L, k) biases, plus its temperature and top-k (k: all).

    Raises:
        LoraFlowError: the gate does not fit the adapters (names, order, k) or the model (layers, hidden
            size), or has module granularity (not supported by the vLLM plugin).
    """
    k = len(adapter_names)
    path = resolve_gate(path)
    if is_official_gate_file(path):
        n, gk, d, state = load_official_gate(path)
        names, granularity, own_temperature, top_k = None, "layer", 1.0, None
    else:
        config, state = load_gate_checkpoint(path)
        n, gk, d = config.num_layers, config.k, config.hidden_size
        names, granularity, own_temperature = config.adapter_names, config.granularity, config.temperature
        top_k = config.top_k
    problems = []
    if names is not None and list(names) != list(adapter_names):
        problems.append(f"it was trained for adapters {','.join(names)}, not {','.join(adapter_names)}")
    elif gk != k:
        problems.append(f"it mixes {gk} adapters but {k} were given")
    if n != num_layers:
        problems.append(f"it has {n} layers but the base model has {num_layers}")
    if d != hidden_size:
        problems.append(f"its hidden size is {d} but the base model's is {hidden_size}")
    if granularity == "module":
        problems.append("module-granularity gates are not supported by the vLLM plugin (layer and model are)")
    if problems:
        raise LoraFlowError(f"gate {path} does not match: " + "; ".join(problems))
    try:
        if granularity == "model":
            weight = state["shared.weight"].float().expand(num_layers, k, hidden_size)
            bias = state["shared.bias"].float().reshape(1, k).expand(num_layers, k)
        else:
            weight = torch.stack([state[f"layers.{i}.weight"].float() for i in range(num_layers)])
            bias = torch.stack([state[f"layers.{i}.bias"].float().reshape(k) for i in range(num_layers)])
    except KeyError as e:
        raise LoraFlowError(f"gate {path}: missing key {e.args[0]}") from None
    if weight.shape != (num_layers, k, hidden_size):
        raise LoraFlowError(f"gate {path}: weights of shape {tuple(weight.shape)}, expected "
                            f"{(num_layers, k, hidden_size)}")
    return (weight.contiguous(), bias.contiguous(), float(own_temperature if temperature is None else temperature),
            top_k or k)


def read_settings(config: object) -> dict:
    """The `loraflow` block of a prepared model's config (a dict or a transformers config), checked."""
    settings = config.get(SETTINGS_KEY) if isinstance(config, Mapping) else getattr(config, SETTINGS_KEY, None)
    if not isinstance(settings, Mapping):
        raise LoraFlowError(f"the model's config.json has no '{SETTINGS_KEY}' block: prepare the model directory "
                            "with loraflow.vllm.prepare_model_dir (or `loraflow serve --engine vllm`)")
    if settings.get("format_version") != FORMAT_VERSION:
        raise LoraFlowError(f"config.json '{SETTINGS_KEY}' block has format_version {settings.get('format_version')!r}, "
                            f"this loraflow reads {FORMAT_VERSION}: prepare the directory again")
    adapters = settings.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        raise LoraFlowError(f"config.json '{SETTINGS_KEY}' block names no adapters")
    return dict(settings)


def load_assets(settings: Mapping, num_layers: int, hidden_size: int) -> FusionAssets:
    """Load the adapters and gates a prepared model's settings name."""
    adapters = [load_adapter(a["name"], a["path"]) for a in settings["adapters"]]
    for adapter in adapters:
        check_adapter_targets(adapter, num_layers)
    names = [a.name for a in adapters]
    weights, biases, temperatures, tops, gate_names = [], [], [], [], []
    for gate in settings.get("gates") or []:
        w, b, t, top = load_gate_stack(gate["path"], names, num_layers, hidden_size, gate.get("temperature"))
        weights.append(w)
        biases.append(b)
        temperatures.append(t)
        tops.append(top)
        gate_names.append(gate["name"])
    k = len(names)
    if weights:
        gate_weight, gate_bias = torch.stack(weights, dim=1), torch.stack(biases, dim=1)
    else:
        gate_weight, gate_bias = torch.zeros(num_layers, 0, k, hidden_size), torch.zeros(num_layers, 0, k)
    top_k = torch.tensor(tops, dtype=torch.long) if any(t < k for t in tops) else None
    return FusionAssets(adapters, gate_names, gate_weight, gate_bias, torch.tensor(temperatures, dtype=torch.float32),
                        str(settings.get("default_fusion") or ("gate" if gate_names else "off")), top_k)
