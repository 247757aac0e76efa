"""Per-call fusion state: which fusion each batch row uses, and each layer's input, for one forward.

A model's default fusion (gate / static / off) is configuration, held by its `FusionEngine`. What
one forward needs while it runs (the resolved plan, the hidden state entering each decoder layer,
the weights computed from it) lives in a `CallContext` reached through a `contextvars.ContextVar`,
never on the modules. Threads each have their own context, so two threads running the same model
with different fusions never see each other's state; asyncio tasks get a copy of their creator's.

    with model.fusion_rows([FusionSpec("gate"), FusionSpec("static", weights=(0.5, 0.5))]):
        model(input_ids=two_rows)          # row 0 mixed by the gate, row 1 by constants

The ContextVars hold read-only mappings {engine key: value}, replaced (never mutated) on every
change, so two models used in one thread keep their own entries.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import MappingProxyType

import torch

from loraflow.common.errors import LoraFlowError
from loraflow.core.fusion_spec import FusionSpec
from loraflow.core.gate import GateBank

_EMPTY: Mapping = MappingProxyType({})
_CALLS: ContextVar[Mapping[str, CallContext]] = ContextVar("loraflow_calls", default=_EMPTY)
_SELECTIONS: ContextVar[Mapping[str, FusionPlan]] = ContextVar("loraflow_selections", default=_EMPTY)
_RECORDERS: ContextVar[Mapping[str, list]] = ContextVar("loraflow_recorders", default=_EMPTY)
_LAST: ContextVar[Mapping[str, list]] = ContextVar("loraflow_last_weights", default=_EMPTY)


def _set(var: ContextVar, key: str, value) -> Token:
    """Set var[key] = value (or drop key when value is None) by replacing the mapping."""
    new = dict(var.get())
    if value is None:
        new.pop(key, None)
    else:
        new[key] = value
    return var.set(MappingProxyType(new))


@dataclass(frozen=True, eq=False)
class FusionPlan:
    """A resolved fusion: constant weights plus the gates some (or all) rows read.

    Attributes:
        label: "gate", "static", "off" (one fusion for all rows) or "rows" (per-row).
        static: constant weights, (k,) for all rows or (B, 1, k) per row (zeros on gate and off
            rows); None when no row has a constant part.
        gates: (gate name, row mask (B,) bool or None for every row) per gate in use.
        rows: the batch size the plan was made for (None: any).
        module_granular: some gate in use has one gate per module (weights differ per module).
        specs: what the plan was made from (for merging static modes and for messages).
    """

    label: str
    static: torch.Tensor | None = None
    gates: tuple[tuple[str, torch.Tensor | None], ...] = ()
    rows: int | None = None
    module_granular: bool = False
    specs: tuple[FusionSpec, ...] = ()

    @property
    def off(self) -> bool:
        return self.static is None and not self.gates


class LayerCall:
    """One decoder layer's part of a call: its input and what the fused layers derived from it."""

    __slots__ = ("hidden", "weights", "scales", "projections")

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden
        self.weights: dict[str | None, torch.Tensor] = {}  # per gate key: (B, T, k)
        self.scales: tuple[torch.Tensor, ...] | None = None  # every group's column scales, (B, T, R_group)
        self.projections: dict = {}  # per input group (the module): (x, its scaled h)


class CallContext:
    """The state of one forward of one model: the plan, each layer's input, and the weights used."""

    def __init__(self, engine: FusionEngine, plan: FusionPlan) -> None:
        self.engine = engine
        self.plan = plan
        self.layers: list[LayerCall | None] = [None] * engine.num_layers
        self.weights: list[torch.Tensor | None] = [None] * engine.num_layers
        self.token: Token | None = None
        # A static fusion merged into the base weights is subtracted from every other fusion.
        merged = engine.merged
        self.offset = None if merged is None or plan is engine.merged_plan else merged
        self.active = not plan.off if merged is None else self.offset is not None
        self.constant_scales: dict[tuple, tuple] = {}  # per layer layout, when no gate is in use

    def begin_layer(self, index: int, hidden: torch.Tensor) -> None:
        rows = self.plan.rows
        if rows is not None and hidden.shape[0] != rows:
            raise LoraFlowError(
                f"fusion_rows: {rows} fusion specs for a batch of {hidden.shape[0]} rows (one spec per row)"
            )
        self.layers[index] = LayerCall(hidden)

    def end_layer(self, index: int) -> None:
        layer = self.layers[index]
        if layer is None:
            return
        if layer.weights and self.plan.gates:
            ws = list(layer.weights.values())
            w = torch.stack(ws).mean(0) if len(ws) > 1 else ws[0]
            if self.offset is not None:
                w = w + self.offset.to(w.device)  # record the fusion used, not its difference to the merged one
            self.weights[index] = w.detach() if torch.is_grad_enabled() else w  # (B, T, k)
        layer.weights, layer.scales, layer.projections = {}, None, {}
        if not torch.is_grad_enabled():
            self.layers[index] = None
        # With gradients on, the layer's input is kept until the call's context is dropped:
        # activation checkpointing in transformers recomputes the layer's `forward` in backward
        # without re-running the module hooks, and the recomputed fused layers must find it here.

    def lora_hidden(self, mixer, module, x: torch.Tensor) -> torch.Tensor | None:
        """dropout(x) @ A^T scaled per column for `module`, or None when there is nothing to add.

        The result is (1, T, R) for a batch of one row (the fused layer adds it with one batched
        matmul) and (N, R) otherwise. Modules of one input group called with the same tensor share
        one projection. This runs once per adapted module per forward, so it keeps its Python work
        and its tensor operations few: every extra op costs microseconds on every layer and token.
        """
        if not self.active:
            return None
        layer = self.layers[mixer.layer_index]
        if layer is None:
            raise RuntimeError(
                f"fused LoRA layer {module.module_key} called outside decoder layer {mixer.layer_index}'s forward")
        group = module.group
        cached = layer.projections.get(group)
        if cached is None or cached[0] is not x:
            if self.plan.module_granular or (module.training and module.has_dropout):
                return self._own_projection(mixer, layer, module, x)  # nothing can be shared
            a_t = group._parameters["lora_A_t"]  # (in, R_group)
            h = torch.matmul(x if x.dtype == a_t.dtype else x.to(a_t.dtype), a_t)  # (..., R_group)
            h = _scale(h, self._group_scales(mixer, layer, group), layer.hidden)
            if h.dim() != 3 or h.shape[0] != 1:
                h = h.view(-1, h.shape[-1])  # (N, R_group)
            # one split for all members (q/k/v) rather than a slice each
            cached = layer.projections[group] = (x, h.split_with_sizes(group.member_sizes, -1) if group.shared else (h,))
        return cached[1][module.member_index]

    def _own_projection(self, mixer, layer: LayerCall, module, x: torch.Tensor) -> torch.Tensor:
        """`module`'s own scaled projection, (N, R): one gate per module, or dropout masks drawn per module."""
        a_t = module.group.lora_A_t
        x_in = x if x.dtype == a_t.dtype else x.to(a_t.dtype)
        w = self._weights(mixer.layer_index, layer, module.module_key if self.plan.module_granular else None)
        scales = self._cast((w @ module.group.column_map.to(w.device, w.dtype))[..., module.columns], a_t)
        h = module.project_with_dropout(x_in.reshape(-1, x.shape[-1]), a_t[:, module.columns])
        return _scale(h, scales, layer.hidden)

    def _group_scales(self, mixer, layer: LayerCall, group) -> torch.Tensor:
        """The group's column scales: (R_group,), (B, 1, R_group) or (B, T, R_group); one matmul per layer."""
        scales = self.constant_scales.get(mixer.layout_key) if not self.plan.gates else layer.scales
        if scales is None:
            w = self._weights(mixer.layer_index, layer, None)  # (k,), (B, 1, k) or (B, T, k)
            scales = self._cast(torch.matmul(w, mixer.column_map(w.device)), group.lora_A_t)
            scales = scales.split_with_sizes(mixer.group_sizes, -1) if len(mixer.group_sizes) > 1 else (scales,)
            if self.plan.gates:
                layer.scales = scales
            else:  # the same constants in every layer of this layout: once per call
                self.constant_scales[mixer.layout_key] = scales
        return scales[group.layer_position]

    @staticmethod
    def _cast(scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return scales if scales.dtype == like.dtype else scales.to(like.dtype)

    def _weights(self, index: int, layer: LayerCall, module_key: str | None) -> torch.Tensor:
        """Adapter weights for the layer's tokens: (B, T, k) with gates, (B, 1, k) per-row constants, else (k,)."""
        w = layer.weights.get(module_key)
        if w is not None:
            return w
        plan, hidden = self.plan, layer.hidden
        w = None if plan.static is None else plan.static.to(hidden.device)
        for name, mask in plan.gates:
            bank = self.engine.gates[name]
            gated = bank.gate(index, module_key if bank.config.granularity == "module" else None)(hidden)  # (B, T, k)
            if mask is None:
                w = gated
            else:
                w = torch.where(mask.to(hidden.device).view(-1, 1, 1), gated, w if w is not None else 0.0)
        if self.offset is not None:
            offset = self.offset.to(hidden.device)
            w = -offset if w is None else w - offset
        if plan.gates:
            layer.weights[module_key] = w
        return w

    def finish(self) -> list[torch.Tensor | None]:
        """The weights each layer used (None where no gate ran)."""
        return self.weights


def _scale(h: torch.Tensor, scales: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """h (..., R) times column scales (R,), (B, 1, R) or (B, T, R); in place at inference.

    A fused layer whose input is flattened to (B * T, in) gets its scales flattened the same way.
    """
    if scales.dim() == 3 and h.dim() != 3:
        tokens = hidden.shape[:-1]
        if h.shape[:-1].numel() != tokens.numel():
            raise RuntimeError(f"a fused LoRA layer got {h.shape[:-1].numel()} rows in a decoder layer "
                               f"of {tokens.numel()} tokens: its rows must be the layer's tokens")
        scales = scales.expand(*tokens, scales.shape[-1]).reshape(*h.shape[:-1], scales.shape[-1])
    return h * scales if torch.is_grad_enabled() else h.mul_(scales)


class FusionEngine:
    """A model's fusion configuration (default plan, named gates) and the entry to per-call state."""

    def __init__(self, num_layers: int, adapter_names: Sequence[str]) -> None:
        self.key = uuid.uuid4().hex
        self.num_layers = num_layers
        self.adapter_names = list(adapter_names)
        self.gates: dict[str, GateBank] = {}
        self.default_gate = "default"
        self.default = FusionPlan("gate", gates=((self.default_gate, None),))
        self.merged: torch.Tensor | None = None  # (k,) static weights merged into the base weights
        self.merged_plan: FusionPlan | None = None
        self._replay: CallContext | None = None

    # ------------------------------------------------------------- plans
    def set_default(self, plan: FusionPlan) -> None:
        if plan.rows is not None:
            raise LoraFlowError("a per-row fusion can only be used for one call (model.fusion_rows)")
        self.default = plan

    def plan(self, spec: FusionSpec, device: torch.device | None = None) -> FusionPlan:
        """The plan that applies `spec` to every row."""
        weights, gate = self._row(spec)
        if gate is not None:
            return FusionPlan("gate", gates=((gate, None),), module_granular=self._module_granular([gate]),
                              specs=(spec,))
        if spec.kind == "off":
            return FusionPlan("off", specs=(spec,))
        return FusionPlan("static", static=weights.to(device), specs=(spec,))

    def row_plan(self, specs: Sequence[FusionSpec], device: torch.device | None = None) -> FusionPlan:
        """The plan that gives row i fusion specs[i] (one spec per batch row)."""
        specs = tuple(specs)
        if not specs:
            raise LoraFlowError("fusion_rows: need one fusion spec per batch row, got none")
        if all(s == specs[0] for s in specs):
            uniform = self.plan(specs[0], device)
            return FusionPlan(uniform.label, uniform.static, uniform.gates, len(specs), uniform.module_granular,
                              specs)
        rows = [self._row(s) for s in specs]
        static = torch.stack([w for w, _ in rows])  # (B, k), zeros on gate/off rows
        names = list(dict.fromkeys(g for _, g in rows if g is not None))
        gates = tuple((name, torch.tensor([g == name for _, g in rows], device=device)) for name in names)
        return FusionPlan(
            "rows", static=static[:, None, :].to(device) if static.any() else None, gates=gates, rows=len(specs),
            module_granular=self._module_granular(names), specs=specs,
        )

    def _row(self, spec: FusionSpec) -> tuple[torch.Tensor, str | None]:
        """(constant weights (k,), gate name or None) of one row's fusion."""
        k = len(self.adapter_names)
        zeros = torch.zeros(k)
        if spec.kind == "gate":
            name = spec.gate or self.default_gate
            if name not in self.gates:
                raise LoraFlowError(f"unknown gate '{name}'; this model's gates are {', '.join(self.gates)}")
            return zeros, name
        if spec.kind == "off":
            return zeros, None
        if spec.kind == "single":
            if spec.adapter not in self.adapter_names:
                raise LoraFlowError(
                    f"unknown adapter '{spec.adapter}'; adapters are {', '.join(self.adapter_names)}"
                )
            return torch.tensor([float(n == spec.adapter) for n in self.adapter_names]), None
        if spec.kind == "static":
            w = torch.as_tensor(spec.weights, dtype=torch.float32).flatten()
            if w.numel() != k:
                raise LoraFlowError(
                    f"got {w.numel()} static weights for {k} adapters ({', '.join(self.adapter_names)})"
                )
            if not torch.isfinite(w).all():
                raise LoraFlowError(f"static weights must be finite numbers, got {spec.weights}")
            return w, None
        raise LoraFlowError(f"fusion {spec} cannot be set on a model (it is a search run by evaluation)")

    def _module_granular(self, gate_names: Sequence[str]) -> bool:
        return any(self.gates[n].config.granularity == "module" for n in gate_names)

    # ------------------------------------------------------------- per-call scope
    @contextlib.contextmanager
    def selecting(self, plan: FusionPlan) -> Iterator[None]:
        """Use `plan` for every forward of this model in the current context, until exit."""
        token = _set(_SELECTIONS, self.key, plan)
        try:
            yield
        finally:
            _SELECTIONS.reset(token)

    def begin_call(self) -> None:
        """Start a forward: resolve the plan and make a fresh CallContext current."""
        plan = _SELECTIONS.get().get(self.key) or self.default
        ctx = CallContext(self, plan)
        ctx.token = _set(_CALLS, self.key, ctx)
        if torch.is_grad_enabled():
            self._replay = ctx  # for activation-checkpoint recomputation in backward (see CallContext.end_layer)

    def end_call(self) -> None:
        """End a forward: publish its weights (last_weights, recorders), drop the CallContext."""
        ctx = _CALLS.get().get(self.key)
        if ctx is None:
            return
        weights = ctx.finish()
        _CALLS.reset(ctx.token)
        recorder = _RECORDERS.get().get(self.key)
        if recorder is not None:
            recorder.append(list(weights))
        _set(_LAST, self.key, weights)  # persists in the caller's context: "the last call", per thread

    def running(self) -> CallContext | None:
        """The context of the forward running in the current context, if any."""
        return _CALLS.get().get(self.key)

    def current(self) -> CallContext | None:
        """The running call's context; in backward recomputation (no call running), the last one with grad."""
        ctx = _CALLS.get().get(self.key)
        return ctx if ctx is not None else self._replay

    @contextlib.contextmanager
    def recording(self) -> Iterator[list]:
        """Collect, per forward in this context, the list of per-layer weights."""
        frames: list = []
        token = _set(_RECORDERS, self.key, frames)
        try:
            yield frames
        finally:
            _RECORDERS.reset(token)

    def last_weights(self) -> list[torch.Tensor | None]:
        return _LAST.get().get(self.key, [])
