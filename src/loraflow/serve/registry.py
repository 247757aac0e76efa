"""Which fusion each served model name stands for, and the per-request `fusion` extension field.

Served models follow vLLM's convention for LoRA: the `model` of a request selects one of
    NAME          for each `--gate NAME=PATH`: LoRA-Flow with that gate;
    ADAPTER       each adapter alone;
    BASE          the base model, adapters off (`--served-model-name`, default: the base's directory name);
    PRESET        each `--fusion NAME=SPEC` (e.g. `avg` or `static:0.7,0.3`).
A request may carry `fusion` to override its model's fusion:
    "off" | "avg" | "gate:NAME" | "single:NAME" | "static:w1,w2"   (the fusion mini-language), or
    {"weights": {"zh": 0.7, "math": 0.5}}   static weights by adapter name (missing adapters get 0),
    {"gate": "zh-math"}                     a loaded gate,
    {"adapter": "math"}                     one adapter alone.

Pure Python: the CLI checks names and presets before loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loraflow.common.errors import LoraFlowError
from loraflow.core.fusion_spec import FusionSpec, parse_fusion

MAX_WEIGHT = 10.0  # |static weight| a request may ask for; LoRAHub's search uses [-1.5, 1.5]


class UnknownModel(LoraFlowError):
    """A request names a model this server does not serve (HTTP 404)."""


@dataclass(frozen=True)
class ServedModel:
    """A name clients put in `model`, and the fusion it runs."""

    name: str
    fusion: FusionSpec
    kind: str  # "gate", "adapter", "base" or "preset": for /v1/models


class ServedModels:
    """The served names of one server; resolves a request's `model` and `fusion` to a FusionSpec."""

    def __init__(self, models: Sequence[ServedModel], adapter_names: Sequence[str], gate_names: Sequence[str]) -> None:
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise LoraFlowError(f"served model names must be unique; {', '.join(dup)} is used more than once "
                                "(gates, adapters, the base's --served-model-name and --fusion presets share one namespace)")
        bad = [n for n in names if not n or any(c.isspace() for c in n)]
        if bad:
            raise LoraFlowError(f"served model names must be non-empty and without spaces: {bad}")
        self.models = {m.name: m for m in models}
        self.adapter_names = list(adapter_names)
        self.gate_names = list(gate_names)

    @classmethod
    def build(cls, *, base_name: str, adapter_names: Sequence[str], gate_names: Sequence[str] = (),
              presets: Mapping[str, str] | None = None) -> ServedModels:
        """The served models of a server: every gate, every adapter, the base, then the presets.

        Raises:
            LoraFlowError: a name used twice, or a preset that is not a valid fusion for these adapters.
        """
        models = [ServedModel(g, FusionSpec("gate", gate=g), "gate") for g in gate_names]
        models += [ServedModel(a, FusionSpec("single", adapter=a), "adapter") for a in adapter_names]
        models.append(ServedModel(base_name, FusionSpec("off"), "base"))
        for name, text in (presets or {}).items():
            spec = _bounded(parse_fusion(text, adapter_names, option=f"--fusion {name}"), f"--fusion {name}={text}")
            models.append(ServedModel(name, _check_gate(spec, gate_names, f"--fusion {name}={text}"), "preset"))
        return cls(models, adapter_names, gate_names)

    def __iter__(self):
        return iter(self.models.values())

    def resolve(self, model: str, fusion: object = None) -> FusionSpec:
        """The fusion for a request: its model's, or the request's `fusion` field when present.

        Raises:
            UnknownModel: `model` is not served.
            LoraFlowError: `fusion` is malformed or names an adapter/gate that is not loaded.
        """
        served = self.models.get(model)
        if served is None:
            raise UnknownModel(f"the model '{model}' does not exist; served models: {', '.join(self.models)}")
        if fusion is None:
            return served.fusion
        return self.parse_request_fusion(fusion)

    def parse_request_fusion(self, value: object) -> FusionSpec:
        """Validate a request's `fusion` field (see the module docstring for the forms)."""
        if isinstance(value, str):
            spec = _bounded(parse_fusion(value, self.adapter_names, option="fusion"), f"fusion {value}")
            return _check_gate(spec, self.gate_names, "fusion")
        if not isinstance(value, Mapping) or len(value) != 1:
            raise LoraFlowError('fusion: expected a fusion string or an object with exactly one of "weights", '
                                '"gate", "adapter"')
        (key, arg), = value.items()
        if key == "gate":
            return _check_gate(FusionSpec("gate", gate=_name(arg, "fusion.gate")), self.gate_names, "fusion.gate")
        if key == "adapter":
            name = _name(arg, "fusion.adapter")
            if name not in self.adapter_names:
                raise LoraFlowError(f"fusion.adapter: no adapter named '{name}' (have {', '.join(self.adapter_names)})")
            return FusionSpec("single", adapter=name)
        if key == "weights":
            return FusionSpec("static", weights=self._weights(arg))
        raise LoraFlowError(f'fusion: unknown key "{key}"; expected "weights", "gate" or "adapter"')

    def _weights(self, arg: object) -> tuple[float, ...]:
        names = self.adapter_names
        if isinstance(arg, Mapping):
            unknown = sorted(set(arg) - set(names))
            if unknown:
                raise LoraFlowError(f"fusion.weights: unknown adapter(s) {unknown}; adapters are {', '.join(names)}")
            values = [arg.get(n, 0.0) for n in names]
        elif isinstance(arg, Sequence) and not isinstance(arg, str):
            if len(arg) != len(names):
                raise LoraFlowError(f"fusion.weights: {len(arg)} weights for {len(names)} adapters ({', '.join(names)})")
            values = list(arg)
        else:
            raise LoraFlowError("fusion.weights: expected an object {adapter: weight} or a list, one weight per adapter")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise LoraFlowError(f"fusion.weights: each weight must be a finite number in [-{MAX_WEIGHT:g}, "
                                    f"{MAX_WEIGHT:g}], got {v!r}")
        return _bounded(FusionSpec("static", weights=tuple(float(v) for v in values)), "fusion.weights").weights


def _bounded(spec: FusionSpec, where: str) -> FusionSpec:
    """Every static fusion, in whatever form it came, has finite weights with |w| <= MAX_WEIGHT."""
    for w in spec.weights or ():
        if not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise LoraFlowError(f"{where}: each weight must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], "
                                f"got {w!r}")
    return spec


def _name(arg: object, where: str) -> str:
    if not isinstance(arg, str) or not arg:
        raise LoraFlowError(f"{where}: expected a name")
    return arg


def _check_gate(spec: FusionSpec, gate_names: Sequence[str], where: str) -> FusionSpec:
    """A gate fusion must name a loaded gate (the only one may be left implicit)."""
    if spec.kind != "gate":
        return spec
    if spec.gate is None:
        if len(gate_names) == 1:
            return FusionSpec("gate", gate=gate_names[0])
        raise LoraFlowError(f"{where}: name the gate, gate:NAME (loaded gates: {', '.join(gate_names) or 'none'})")
    if spec.gate not in gate_names:
        raise LoraFlowError(f"{where}: no gate named '{spec.gate}' (loaded gates: {', '.join(gate_names) or 'none'})")
    return spec
