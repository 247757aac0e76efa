"""Per-call fusion: which fusion each batch row uses, turned into tensors before each forward.

A model's default fusion (gate / static / off) is configuration, held by its `FusionEngine`.
`with model.fusion(spec)` / `fusion_rows(specs)` choose a plan for the current thread (or asyncio
task) through a `contextvars.ContextVar`. Before each forward, outside any compiled graph, the
engine resolves the plan and writes it into the model's one `FusionMetadata` (per-row static
weights (B, 1, k), a per-row gate selector (B, 1, G), the gates' temperatures): the fused layers
read only those tensors and the gates' parameters, so a compiled graph serves every fusion.

    with model.fusion_rows([FusionSpec("gate"), FusionSpec("static", weights=(0.5, 0.5))]):
        model(input_ids=two_rows)          # row 0 mixed by the gate, row 1 by constants

One forward runs at a time per model (a lock from metadata fill to the end of the forward), so
threads with different fusions queue instead of seeing each other's metadata. The ContextVars
hold read-only mappings {engine key: value}, replaced (never mutated) on every change, so two
models used in one thread keep their own entries.
"""

from __future__ import annotations

import contextlib
import threading
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


# How the fused layers run a step, in eager mode (a compiled graph always runs MIXED: one graph for all).
OFF, CONST, GATE, MIXED = "off", "const", "gate", "mixed"


class FusionStep:
    """One forward's fusion as tensors, what every decoder layer reads (vLLM's per-step LoRA metadata).

    Attributes:
        static: (B, 1, k) float32 constant weights per row (zeros on gate and off rows), minus the
            static fusion merged into the base weights, if any.
        select: (B, 1, G) float32, 1 where a row takes gate g's output (gates in the model's order).
        temperature: (G,) float32, each gate's softmax temperature.
        kind: the cheapest eager path that computes the same: OFF (nothing to add), CONST (no gate:
            column scales once per layer layout), GATE (one gate for every row:
            the GateBank `bank`, plus `static` when `has_static`), MIXED (the general formula).
        module_granular: a gate in use has one gate per module (eager; compiled graphs read the model's).
        rows: the batch size the fusion was made for (fusion_rows), else None.
        plan: the plan it was made from.
    """

    __slots__ = ("static", "select", "temperature", "kind", "bank", "has_static", "module_granular", "rows",
                 "plan", "const_scales")

    def __init__(self, static: torch.Tensor, select: torch.Tensor, temperature: torch.Tensor) -> None:
        self.static, self.select, self.temperature = static, select, temperature
        self.kind, self.bank, self.has_static, self.module_granular = OFF, None, False, False
        self.rows: int | None = None
        self.plan: FusionPlan | None = None
        self.const_scales: dict = {}  # CONST: per (layer layout, device), the layer's column scales

    def check_rows(self, batch: int) -> None:
        if self.rows is not None and batch != self.rows:
            raise LoraFlowError(
                f"fusion_rows: {self.rows} fusion specs for a batch of {batch} rows (one spec per row)")


class FusionMetadata:
    """A model's per-step fusion tensors: `step` is what the running forward reads.

    `fill` turns a plan into tensors before a forward, outside any compiled graph. Without
    gradients the tensors are fixed buffers (one set per batch size and device) written in place,
    so a compiled graph (and a CUDA graph) reads the same addresses every step and a fusion change
    is new data, never a new graph. With gradients each forward gets fresh tensors (autograd saves
    them, so they must not change before backward).
    """

    def __init__(self) -> None:
        self.step: FusionStep | None = None
        self._buffers: dict[tuple, FusionStep] = {}
        self._prepared: dict[tuple, tuple] = {}  # per plan and batch size: its tensors, built once on the CPU

    def fill(self, plan: FusionPlan, batch: int | None, gates: Mapping[str, GateBank], k: int,
             merged: torch.Tensor | None, merged_plan: FusionPlan | None, device: torch.device) -> FusionStep:
        """Write `plan` for a batch of `batch` rows (None: unknown) into the step's tensors."""
        names = list(gates)
        rows = plan.rows or batch or 1
        offset = merged if merged is not None and plan is not merged_plan else None
        temps = tuple(float(gates[n].config.temperature) for n in names)
        key = (id(plan), rows, id(offset), tuple(names), temps)
        prepared = self._prepared.get(key)
        if prepared is None or prepared[0] is not plan or prepared[1] is not offset:
            if len(self._prepared) > 64:
                self._prepared = {}
            static = torch.zeros(rows, k)
            if plan.static is not None:
                static += plan.static.detach().float().cpu().reshape(-1, k)  # (k,) or (B, k)
            if offset is not None:
                static -= offset.float().cpu()  # a merged static fusion is subtracted from every other one
            select = torch.zeros(rows, len(names))
            for name, mask in plan.gates:
                select[:, names.index(name)] = 1.0 if mask is None else mask.float().cpu()
            prepared = self._prepared[key] = (plan, offset, static[:, None], select[:, None],
                                              torch.tensor(temps, dtype=torch.float32))
        _, _, static, select, temperature = prepared

        if torch.is_grad_enabled():
            step = FusionStep(static.to(device, copy=True), select.to(device, copy=True), temperature.to(device, copy=True))
        else:
            key = (rows, k, len(names), device)
            step = self._buffers.get(key)
            if step is None:
                step = self._buffers[key] = FusionStep(
                    torch.zeros(rows, 1, k, device=device), torch.zeros(rows, 1, len(names), device=device),
                    torch.zeros(len(names), device=device))
                if device.type == "cuda":  # fixed addresses for CUDA graphs
                    for t in (step.static, step.select, step.temperature):
                        torch._dynamo.mark_static_address(t)
            step.static.copy_(static)
            step.select.copy_(select)
            step.temperature.copy_(temperature)
            step.const_scales = {}
        active = not plan.off if merged is None else offset is not None
        uniform_gate = len(plan.gates) == 1 and plan.gates[0][1] is None
        if not active:
            step.kind = OFF
        elif not plan.gates:
            step.kind = CONST
        elif uniform_gate and plan.static is None:
            step.kind, step.bank, step.has_static = GATE, gates[plan.gates[0][0]], offset is not None
        else:
            step.kind = MIXED
        step.module_granular = plan.module_granular
        step.rows, step.plan = plan.rows, plan
        self.step = step
        return step

    def clear(self) -> None:
        """Drop the buffers (the gates changed: their number is part of the shapes)."""
        self._buffers, self._prepared = {}, {}


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
        self.meta = FusionMetadata()
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread whose forward holds the lock
        self._callers: list = []  # the modules whose forward is open, outermost first
        self.module_gates = False  # some gate has one gate per module (compiled graphs then weight per module)
        self.in_call = False  # a plain flag a compiled graph can check (at trace time) that the metadata was filled
        self._graph_version = 0
        self.graph_key = f"{self.key}:0"  # read by compiled graphs, which dynamo then guards on (loraflow.core.guards)

    def new_graph_key(self) -> None:
        """Mark the graphs compiled so far as stale (gates changed, compiled again): their guard on the key fails."""
        self._graph_version += 1
        self.graph_key = f"{self.key}:{self._graph_version}"

    def add_gate(self, name: str, bank: GateBank) -> None:
        """Make `bank` selectable by `name`."""
        self.gates[name] = bank
        self.module_gates = self._module_granular(list(self.gates))
        self.meta.clear()
        self.new_graph_key()

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

    def begin_call(self, batch: int | None, device: torch.device, caller: object = None) -> None:
        """Start a forward of `caller` (eager code only, never inside a compiled graph): take the model's
        lock, resolve this context's plan and fill the metadata. A nested call (the LoraFlowModel, then
        its transformers model, then the decoder stack) only counts the depth.

        One forward runs at a time per model: the lock is held from here to `end_call`, so a thread
        never sees another thread's metadata (threads queue; each gets what it gets alone).
        """
        me = threading.get_ident()
        if self._owner == me:
            if caller not in self._callers:
                self._callers.append(caller)
                return
            # `caller` is open already: its last forward ended without its end hook (a KeyboardInterrupt
            # skips always_call hooks); start afresh, the lock is still ours
            self._owner = None
            self._lock.release()
        self._lock.acquire()
        try:
            plan = _SELECTIONS.get().get(self.key) or self.default
            if plan.rows is not None and batch is not None and batch != plan.rows:
                raise LoraFlowError(
                    f"fusion_rows: {plan.rows} fusion specs for a batch of {batch} rows (one spec per row)")
            self.meta.fill(plan, batch, self.gates, len(self.adapter_names), self.merged, self.merged_plan, device)
        except BaseException:
            self._lock.release()
            raise
        self._owner, self._callers, self.in_call = me, [caller], True

    def end_call(self, mixers: Sequence, caller: object = None) -> None:
        """End `caller`'s forward; the outermost publishes its weights (last_weights, recorders) and releases
        the lock."""
        if self._owner != threading.get_ident() or caller not in self._callers:
            return
        del self._callers[self._callers.index(caller):]
        if self._callers:
            return
        try:
            weights = self._collect(mixers)
            recorder = _RECORDERS.get().get(self.key)
            if recorder is not None:
                recorder.append(list(weights))
            _set(_LAST, self.key, weights)  # persists in the caller's context: "the last call", per thread
        finally:
            self._owner, self.in_call = None, False
            self._lock.release()

    def abandon(self) -> None:
        """Close this thread's forward without publishing (its end hooks did not run, e.g. after a
        KeyboardInterrupt, which torch's always_call hooks do not catch), so other threads can go on."""
        if self._owner == threading.get_ident():
            self._owner, self._callers, self.in_call = None, [], False
            self._lock.release()

    @property
    def open(self) -> bool:
        """A forward of this model is running in this thread."""
        return self._owner == threading.get_ident()

    def _collect(self, mixers: Sequence) -> list[torch.Tensor | None]:
        """Each layer's weights (B, T, k) of the call that ends (None for every layer when no gate ran)."""
        step = self.meta.step
        out: list[torch.Tensor | None] = []
        for mixer in mixers:
            w, mixer.weights = mixer.weights, None
            out.append(w)
        if step is None or not step.plan.gates or any(w is None for w in out):
            return [None] * len(out)
        grad = torch.is_grad_enabled()
        merged = self.merged if step.plan is not self.merged_plan else None
        result = []
        for w in out:
            if merged is not None:
                w = w + merged.to(w.device)  # record the fusion used, not its difference to the merged one
            result.append(w.detach() if grad else w)
        return result

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
