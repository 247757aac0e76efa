"""Fusion gates: w = softmax(W x / T) + b, computed from the hidden state entering a layer.

The bias is added after the softmax (as in the paper), so weights need not sum to one and may be
negative. Gates are kept in fp32 whatever the base model's dtype: they are tiny, and the softmax
is better in full precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from loraflow.common.checks import check_positive
from loraflow.core.fusion_math import gate_weights

GRANULARITIES = ("layer", "model", "module")
OFFICIAL_K2_BIAS = (-0.5, 0.5)  # (language, task): the authors' initialisation for k = 2


@dataclass
class GateConfig:
    """Everything needed to rebuild a gate bank and to check it fits a model and its adapters.

    Attributes:
        adapter_names: adapter names in gate-output order (index i of w weights adapter i).
        hidden_size: width of the hidden state the gates read.
        num_layers: number of decoder layers of the base model.
        temperature: softmax temperature T (the authors used 1.1 for zh/ru math, else 1.0).
        top_k: keep each token's top_k largest gate logits (softmax over them, their biases added, the
            other adapters weighing 0); None keeps all k, the paper's gate. Fixed when the bank is built.
        granularity: "layer" (one gate per layer, the paper's default), "model" (one gate shared
            by all layers, each reading its own layer's input) or "module" (one gate per adapted
            module, all reading the layer's input).
        base_model: name or path of the base model the gate was trained on (informational).
        model_type: the base config's model_type, checked on load.
        module_keys: for "module" granularity, per layer the adapted module names within it.
        adapters: per adapter a short summary (ranks, targets), informational.
    """

    adapter_names: list[str]
    hidden_size: int
    num_layers: int
    temperature: float = 1.0
    granularity: str = "layer"
    base_model: str | None = None
    model_type: str | None = None
    module_keys: list[list[str]] | None = None
    adapters: list[dict] = field(default_factory=list)
    format_version: int = 1
    top_k: int | None = None

    def __post_init__(self) -> None:
        if not self.adapter_names:
            raise ValueError("adapter_names: need at least one adapter (k >= 1)")
        if len(set(self.adapter_names)) != len(self.adapter_names):
            raise ValueError(f"adapter_names: duplicate names in {self.adapter_names}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.hidden_size <= 0 or self.num_layers <= 0:
            raise ValueError("hidden_size and num_layers must be positive")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or not 1 <= self.top_k <= len(self.adapter_names)):
            raise ValueError(f"top_k: must be a whole number from 1 to k = {len(self.adapter_names)}, got {self.top_k!r}")
        if self.granularity == "module" and self.module_keys is None:
            raise ValueError("module_keys: required for module granularity")

    @property
    def k(self) -> int:
        return len(self.adapter_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GateConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: v for key, v in d.items() if key in known})


class FusionGate(nn.Module):
    """One gate: hidden (..., d) -> fusion weights (..., k) = softmax(x W^T / T) + b.

    T is read from `settings` (any object with a `temperature`): a bank's gates share its GateConfig, the
    one place that holds their temperature, which every execution path reads; a lone gate has its own."""

    def __init__(self, hidden_size: int, num_adapters: int, temperature: float = 1.0, *, settings=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_adapters, hidden_size))
        self.bias = nn.Parameter(torch.zeros(1, num_adapters))
        if settings is None:
            settings = SimpleNamespace(temperature=check_positive("temperature", temperature), top_k=None)
        self.__dict__["_settings"] = settings  # not a submodule or state: shared, never saved

    @property
    def temperature(self) -> float:
        """The softmax temperature T (a finite number > 0), shared by every gate of a bank."""
        return self._settings.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._settings.temperature = check_positive("temperature", value)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weight
        x = hidden if hidden.device == w.device else hidden.to(w.device)
        out = gate_weights(x, w, self.bias, self.temperature, self._settings.top_k)  # (..., k)
        return out if out.device == hidden.device else out.to(hidden.device)  # a shared gate on another device

    def reset_parameters(self, *, std: float = 1e-3, bias: tuple[float, ...] | None = None) -> None:
        """Small random W (near-uniform softmax at start) and the official bias for k = 2."""
        k = self.weight.shape[0]
        with torch.no_grad():
            self.weight.normal_(0.0, std)
            if bias is None:
                bias = OFFICIAL_K2_BIAS if k == 2 else (0.0,) * k
            if len(bias) != k:
                raise ValueError(f"bias init has {len(bias)} values for {k} adapters")
            self.bias.copy_(torch.tensor(bias, dtype=self.bias.dtype).view(1, k))

    def extra_repr(self) -> str:
        return f"hidden={self.weight.shape[1]}, k={self.weight.shape[0]}, temperature={self.temperature}"


class GateBank(nn.Module):
    """All gates of a model, arranged by granularity; `gate(layer, module_key)` finds the right one.

    State-dict keys: `layers.{i}.weight|bias` (layer), `shared.weight|bias` (model),
    `layers.{i}.{module_key with '.'->'__'}.weight|bias` (module).
    """

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        d, k = config.hidden_size, config.k
        if config.granularity == "layer":
            self.layers = nn.ModuleList(FusionGate(d, k, settings=config) for _ in range(config.num_layers))
        elif config.granularity == "model":
            self.shared = FusionGate(d, k, settings=config)
        else:
            self.layers = nn.ModuleList(
                nn.ModuleDict({_safe(key): FusionGate(d, k, settings=config) for key in keys})
                for keys in config.module_keys
            )

    def gate(self, layer: int, module_key: str | None = None) -> FusionGate:
        granularity = self.config.granularity
        if granularity == "layer":
            return self.layers[layer]
        if granularity == "model":
            return self.shared
        return self.layers[layer][_safe(module_key)]

    def gates(self) -> list[FusionGate]:
        return [m for m in self.modules() if isinstance(m, FusionGate)]

    def reset_parameters(self, *, std: float = 1e-3, bias: tuple[float, ...] | None = None) -> None:
        for g in self.gates():
            g.reset_parameters(std=std, bias=bias)

    def set_temperature(self, temperature: float) -> None:
        """Set every gate's softmax temperature.

        Raises:
            ValueError: `temperature` is not a finite number > 0 (NaN or inf would make every logit NaN).
        """
        self.config.temperature = check_positive("temperature", temperature)  # what every gate of the bank reads


def _safe(module_key: str | None) -> str:
    if module_key is None:
        raise ValueError("module granularity needs a module key")
    return module_key.replace(".", "__")
