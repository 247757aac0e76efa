"""Attaching fused LoRA layers and fusion gates to an unmodified Hugging Face decoder model.

Two mechanisms, nothing forked:
- every adapted linear module is replaced (as a module) by a `FusedLoraLinear` wrapping it;
- the model (and the module running its decoder layers) gets hooks that open and close one
  forward: fill the fusion metadata (see `loraflow.core.fusion_context`) before it, publish the
  fusion weights after it; every decoder layer gets a forward pre-hook that hands the hidden state
  entering the layer (before its input layernorm) to the layer's `LayerMixer`, which runs the gates
  once for the layer, and a forward hook that drops what the layer no longer needs.

Decoder layers and adapted modules are found from the model and the adapter weights, never from
hard-coded architecture names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from loraflow.core.adapters import LoraAdapter
from loraflow.common.errors import LoraFlowError
from loraflow.core.fused_linear import FusedLoraLinear, LoraInputGroup, is_dynamo_compiling, linear_dims
from loraflow.core.fusion_context import CONST, GATE, MIXED, OFF, FusionEngine, FusionPlan
from loraflow.core.fusion_math import column_scales, mixed_weights, scaled_projection
from loraflow.core.fusion_spec import FusionSpec
from loraflow.core.gate import GateBank

class LayerMixer:
    """One decoder layer's fusion: from the layer's input and the step's metadata (see
    `loraflow.core.fusion_context`) to the per-token column scales its fused linears read.

    The layer's forward pre-hook calls `begin` (the gates run here, once per layer), its fused
    linears call `lora_hidden`, its forward hook calls `end`. All of it is tensor code over the
    metadata's tensors; in a compiled graph it always takes the general path (every gate, static
    weights, selector), so one graph serves every fusion. In eager mode it takes the cheapest path
    that computes the same (nothing when adapters are off, no gate for constant weights).
    """

    def __init__(self, layer_index: int, engine: FusionEngine) -> None:
        self.layer_index = layer_index
        self.engine = engine
        self.groups: list[LoraInputGroup] = []
        self.layout_key: tuple = ()
        self.group_sizes: list[int] = []  # columns of each group, in order
        self._cmap: torch.Tensor | None = None
        self._column_maps: dict = {}
        # state while the layer runs (kept after it with gradients on: activation checkpointing
        # recomputes the layer's forward in backward without its hooks, and must find it here)
        self.hidden: torch.Tensor | None = None  # (B, T, d), the layer's input
        self.step = None  # the FusionStep in use
        self.kind = OFF
        self.compiling = False  # set by `begin`: True while torch.compile traces the layer
        self.scales: tuple[torch.Tensor, ...] | None = None  # per group (B, T|1, R_group); None: nothing to add
        self.own = False  # weights per module (module-level gates): no shared scales
        self.projections: list = []  # per group, (x, its scaled h split per member) while the layer runs
        self.module_weights: list[torch.Tensor] = []
        self.weights: torch.Tensor | None = None  # (B, T, k) this call's, until the engine collects them

    def set_groups(self, groups: list[LoraInputGroup]) -> None:
        """The layer's input groups; their column maps side by side give all its scales in one matmul."""
        self.groups = list(dict.fromkeys(groups))
        for i, g in enumerate(self.groups):
            g.layer_position = i
        self.group_sizes = [g.lora_A_t.shape[1] for g in self.groups]
        self.layout_key = tuple(g.layout_key for g in self.groups)
        self._column_maps = {}
        self._cmap = self._build_cmap(self.groups[0].column_map.device) if self.groups else None

    def _build_cmap(self, device: torch.device) -> torch.Tensor:
        return torch.cat([g.column_map.to(device=device, dtype=torch.float32) for g in self.groups], dim=1)

    def column_map(self, device: torch.device) -> torch.Tensor:
        """(k, R_layer): every group's column map, side by side (per device)."""
        cmap = self._cmap
        if cmap is not None and cmap.device == device:
            return cmap
        cmap = self._column_maps.get(device)
        if cmap is None:
            cmap = self._column_maps[device] = self._build_cmap(device)
        return cmap

    # ----------------------------------------------------------------- per layer call
    def begin(self, hidden: torch.Tensor) -> None:
        """The layer starts: compute its column scales from its input `hidden` (B, T, d)."""
        compiling = self.compiling = is_dynamo_compiling()  # the layer's fused linears read this flag
        engine = self.engine
        step = engine.meta.step
        if not compiling:
            if not engine.in_call:  # a recomputation in backward (transformers < 5 re-runs hooks)
                step = self.step
            if step is None:
                raise RuntimeError(f"decoder layer {self.layer_index} was called outside its model's forward")
            if step.rows is not None:
                step.check_rows(hidden.shape[0])
        elif not engine.graph_key:  # used in the graph, so dynamo guards it: a new key retraces (core.guards)
            raise RuntimeError("a compiled graph runs a fusion engine without a graph key")
        kind = MIXED if compiling else step.kind
        self.hidden, self.step, self.kind = hidden, step, kind
        self.projections = [None] * len(self.groups)
        if self.module_weights:
            self.module_weights = []
        self.own = kind != OFF and kind != CONST and (
            engine.module_gates if compiling or kind == MIXED else step.module_granular)
        if kind == OFF or self.own:
            self.scales = None
        elif kind == CONST:
            self.scales = self._const_scales(step, hidden.device)
        else:
            w = self.weights = self._weights(None)  # (B, T, k)
            self.scales = self._split(column_scales(w, self.column_map(w.device))) if self.groups else None

    def end(self) -> None:
        """The layer is done: keep its weights for the call's record, drop what it no longer needs."""
        if self.module_weights:
            ws = self.module_weights
            if self.own:
                self.weights = torch.stack(ws).mean(0) if len(ws) > 1 else ws[0]
            self.module_weights = []
        self.projections = [None] * len(self.groups)
        if not torch.is_grad_enabled():
            self.hidden, self.scales, self.step = None, None, None

    def lora_hidden(self, module: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """`module`'s scaled low-rank hidden for input x: (1, T, R) for one row, else (N, R); or None
        when there is nothing to add. Modules of one input group called with the same tensor share one
        projection. This runs once per adapted module per forward, so it keeps its Python work and its
        tensor operations few: every extra op costs microseconds on every layer and token."""
        if self.hidden is None:
            raise RuntimeError(
                f"fused LoRA layer {module.module_key} called outside decoder layer {self.layer_index}'s forward")
        if self.own or (module.training and module.has_dropout):
            return self._own_projection(module, x)  # nothing can be shared
        scales = self.scales
        if scales is None:
            return None
        group = module.group
        position = group.layer_position
        cached = self.projections[position]
        if cached is None or cached[0] is not x:
            a_t = group.lora_A_t if self.compiling else group._parameters["lora_A_t"]
            h = scaled_projection(x, a_t, self._group_scales(position, x), inplace=not torch.is_grad_enabled())
            cached = self._keep(group, x, h)
        return cached[1][module.member_index]

    def wants_projection(self, module: FusedLoraLinear, x: torch.Tensor) -> bool:
        """Whether `module` (folded: its base matmul also yields its group's A projection) should hand
        this layer its group's projection of x: the shared scaled path is in use and nothing cached it yet."""
        if self.scales is None or self.own or (module.training and module.has_dropout):
            return False
        cached = self.projections[module.group.layer_position]
        return cached is None or cached[0] is not x

    def keep_projection(self, module: FusedLoraLinear, x: torch.Tensor, h: torch.Tensor,
                        base_outputs: list[torch.Tensor]) -> None:
        """Take `module`'s group's unscaled projection h = x @ A^T and its members' base outputs (computed
        in one matmul, see `FusedLoraLinear.fold`), and scale h as `lora_hidden` would have."""
        scales = self._group_scales(module.group.layer_position, x)
        self._keep(module.group, x, h * (scales if scales.dtype == h.dtype else scales.to(h.dtype)), base_outputs)

    def _group_scales(self, position: int, x: torch.Tensor) -> torch.Tensor:
        """Input group `position`'s column scales for x: (B, T|1, R) as they are, or flattened like x."""
        scales = self.scales[position]
        return scales if x.dim() == 3 else _tokens_like(scales, x, self.hidden)

    def base_output(self, module: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """`module`'s base output for x if its group's folded matmul computed it already, else None."""
        cached = self.projections[module.group.layer_position]
        if cached is None or cached[0] is not x or cached[2] is None:
            return None
        return cached[2][module.member_index]

    def _keep(self, group: LoraInputGroup, x: torch.Tensor, h: torch.Tensor,
              base_outputs: list[torch.Tensor] | None = None) -> tuple:
        """Cache the group's scaled projection h (..., R_group) of x, split per member (and the members'
        base outputs, when a folded matmul made them)."""
        if h.dim() != 3 or h.shape[0] != 1:
            h = h.reshape(-1, h.shape[-1])  # (N, R_group)
        # one split for all members (q/k/v) rather than a slice each
        cached = (x, h.split_with_sizes(group.member_sizes, -1) if group.shared else (h,), base_outputs)
        self.projections[group.layer_position] = cached
        return cached

    def _own_projection(self, module: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """`module`'s own scaled projection, (N, R): one gate per module, or dropout masks drawn per module."""
        group = module.group
        if self.own:
            w = self._weights(module.module_key)  # (B, T, k)
            self.module_weights.append(w)
            scales = column_scales(w, group.column_map.to(w.device))[..., module.columns]
        elif self.scales is None:
            return None
        else:
            scales = self.scales[group.layer_position][..., module.columns]
        a_t = group.lora_A_t
        x_in = x if x.dtype == a_t.dtype else x.to(a_t.dtype)
        h = module.project_with_dropout(x_in.reshape(-1, x.shape[-1]), a_t[:, module.columns])  # (N, R)
        return h * _tokens_like(scales, h, self.hidden).to(h.dtype)

    def _weights(self, module_key: str | None) -> torch.Tensor:
        """The fusion weights (B, T, k) of the layer's tokens (for one module with module-level gates)."""
        step, hidden, index = self.step, self.hidden, self.layer_index
        if self.kind == GATE:  # one gate for every row
            bank = step.bank
            w = bank.gate(index, module_key if bank.config.granularity == "module" else None)(hidden)
            return w + step.static.to(w.device) if step.has_static else w
        banks = list(self.engine.gates.values())
        gates = [b.gate(index, module_key if b.config.granularity == "module" else None) for b in banks]
        device = hidden.device
        weight = torch.stack([g.weight.to(device) for g in gates])  # (G, k, d)
        bias = torch.stack([g.bias.reshape(-1).to(device) for g in gates])  # (G, k)
        k = weight.shape[1]
        tops = [b.config.top_k or k for b in banks]  # fixed per gate set (a new gate retraces: its graph key)
        top_k = None if all(t == k for t in tops) else torch.tensor(tops, device=device)
        return mixed_weights(hidden, step.static.to(device), step.select.to(device), weight, bias,
                             step.temperature.to(device), top_k)

    def _const_scales(self, step, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """Constant weights: the same scales in every layer of this layout, computed once per step and device."""
        if not self.groups:
            return None
        key = (self.layout_key, device)
        scales = step.const_scales.get(key)
        if scales is None:
            scales = step.const_scales[key] = self._split(
                column_scales(step.static.to(device), self.column_map(device)))  # (B, 1, R_layer)
        return scales

    def _split(self, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The layer's scales cast to the adapters' dtype, one part per input group."""
        dtype = self.groups[0].lora_A_t.dtype
        scales = scales if scales.dtype == dtype else scales.to(dtype)
        return scales.split_with_sizes(self.group_sizes, -1) if len(self.group_sizes) > 1 else (scales,)


def _tokens_like(scales: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Column scales (B, T|1, R) for x of the layer's tokens: as they are for x (B, T, in), flattened
    like x when an architecture feeds a fused layer (B * T, in)."""
    if scales.dim() != 3 or x.dim() == 3:
        return scales
    tokens = hidden.shape[:-1]
    if x.shape[:-1].numel() != tokens.numel():
        raise RuntimeError(f"a fused LoRA layer got {x.shape[:-1].numel()} rows in a decoder layer "
                           f"of {tokens.numel()} tokens: its rows must be the layer's tokens")
    return scales.expand(*tokens, scales.shape[-1]).reshape(*x.shape[:-1], scales.shape[-1])


@dataclass
class Attachment:
    """What attach_adapters changed, so it can be undone."""

    layers_path: str
    mixers: list[LayerMixer]
    replaced: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute, original module)
    hooks: list = field(default_factory=list)
    module_keys: list[list[str]] = field(default_factory=list)

    @property
    def fused(self) -> list[FusedLoraLinear]:
        return [getattr(parent, attr) for parent, attr, _ in self.replaced]

    def detach(self, engine: FusionEngine | None = None) -> None:
        unfold(self)  # first: an unmerge of folded weights would fold them again
        unmerge(self, engine)
        for handle in self.hooks:
            handle.remove()
        for parent, attr, original in self.replaced:
            setattr(parent, attr, original)
        self.hooks, self.replaced = [], []


def num_hidden_layers(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise LoraFlowError(f"unknown architecture {type(model).__name__}: its config has no num_hidden_layers")
    return int(n)


def hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: as long as num_hidden_layers, holding the most parameters."""
    n = num_hidden_layers(model)
    candidates = [
        (sum(p.numel() for p in mod.parameters()), name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0
    ]
    if not candidates:
        raise LoraFlowError(
            f"unknown architecture {type(model).__name__}: found no list of {n} decoder layers in the model"
        )
    _, name, layers = max(candidates, key=lambda c: c[0])
    return name, layers


def _layer_of(module_path: str, layers_path: str, n: int) -> tuple[int, str] | None:
    prefix = f"{layers_path}." if layers_path else ""
    if not module_path.startswith(prefix):
        return None
    idx, _, key = module_path[len(prefix):].partition(".")
    if not idx.isdigit() or int(idx) >= n or not key:
        return None
    return int(idx), key


def _stack(adapters: list[LoraAdapter], module_path: str, base: nn.Module, dtype: torch.dtype):
    in_f, out_f = linear_dims(base)
    a_parts, b_parts, index, scaling = [], [], [], []
    dropouts = [0.0] * len(adapters)  # per adapter, as PEFT holds one dropout module per adapter
    for i, adapter in enumerate(adapters):
        weights = adapter.modules.get(module_path)
        if weights is None:
            continue  # this adapter does not touch the module: it contributes 0
        if weights.lora_A.shape[1] != in_f or weights.lora_B.shape[0] != out_f:
            raise LoraFlowError(
                f"adapter '{adapter.name}' ({adapter.path}) does not fit the base model: module {module_path} "
                f"is {in_f}->{out_f} but the adapter has A {tuple(weights.lora_A.shape)}, "
                f"B {tuple(weights.lora_B.shape)} (trained on another base?)"
            )
        a_parts.append(weights.lora_A)
        b_parts.append(weights.lora_B)
        index += [i] * weights.rank
        scaling += [weights.scale] * weights.rank
        dropouts[i] = adapter.dropout
    lora_A = torch.cat(a_parts, 0).to(dtype)  # (R, in)
    lora_B = torch.cat([b.t() for b in b_parts], 0).to(dtype).t()  # (out, R), a view of a contiguous (R, out)
    return lora_A, lora_B, torch.tensor(index), torch.tensor(scaling), dropouts


def attach_adapters(model: nn.Module, adapters: list[LoraAdapter], engine: FusionEngine) -> Attachment:
    """Replace every adapted module by a FusedLoraLinear and hook the decoder layers.

    The adapters' tensors are moved into the stacked form and dropped from `adapters`, so the
    weights are held once.

    Raises:
        LoraFlowError: an adapter names a module the model lacks, outside a decoder layer, of an
            unsupported type, or of a different shape.
    """
    layers_path, layers = find_decoder_layers(model)
    n = len(layers)
    module_paths: dict[str, tuple[int, str]] = {}
    for adapter in adapters:
        for path in adapter.modules:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise LoraFlowError(
                    f"adapter '{adapter.name}' ({adapter.path}) targets {path}, which the base model "
                    f"{type(model).__name__} does not have (trained on another base?)"
                ) from None
            where = _layer_of(path, layers_path, n)
            if where is None:
                raise LoraFlowError(
                    f"adapter '{adapter.name}' ({adapter.path}) adapts {path}, which is outside the decoder "
                    f"layers ({layers_path}); only modules inside decoder layers can be fused"
                )
            try:
                linear_dims(module)
            except TypeError as e:
                raise LoraFlowError(f"adapter '{adapter.name}' ({adapter.path}): {path}: {e}") from None
            if module.weight.is_meta:
                raise LoraFlowError(
                    f"{path} is offloaded (its weights are on the meta device, e.g. device_map with CPU/disk "
                    f"offload): its LoRA weights would be lost; load the base with every adapted layer on a device"
                )
            module_paths[path] = where

    if engine.num_layers != n:
        raise ValueError(f"engine made for {engine.num_layers} layers, the model has {n}")
    mixers = [LayerMixer(i, engine) for i in range(n)]
    replaced = []
    module_keys: list[list[str]] = [[] for _ in range(n)]
    layouts: dict[tuple, int] = {}
    for path, (layer_idx, key) in sorted(module_paths.items()):
        base = model.get_submodule(path)
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        lora_A, lora_B, index, scaling, dropout = _stack(adapters, path, base, dtype)
        layout = layouts.setdefault((tuple(index.tolist()), tuple(scaling.tolist())), len(layouts))
        fused = FusedLoraLinear(
            base, lora_A.to(base.weight.device), lora_B.to(base.weight.device), index, scaling,
            num_adapters=len(adapters), dropout=dropout, module_key=key, layout_key=layout,
        ).to(base.weight.device)
        fused.train(base.training)  # a new module starts in training mode; follow the model's mode
        fused.layer_index = layer_idx
        fused.mixer = mixers[layer_idx]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, fused)
        replaced.append((parent, attr, base))
        module_keys[layer_idx].append(key)
    for adapter in adapters:
        adapter.modules.clear()  # the stacked copies are now the only ones

    attachment = Attachment(layers_path, mixers, replaced, module_keys=module_keys)
    stack = model.get_submodule(layers_path.rpartition(".")[0])  # the module that runs the layers
    attachment.hooks += add_call_hooks(model, engine, mixers)
    if stack is not model:
        attachment.hooks += add_call_hooks(stack, engine, mixers)
    for mixer, layer in zip(mixers, layers):
        attachment.hooks.append(layer.register_forward_pre_hook(_pre_hook(mixer), with_kwargs=True))
        attachment.hooks.append(layer.register_forward_hook(_post_hook(mixer), always_call=True))
    share_inputs(model, attachment, engine)
    return attachment


def place_gates(gates: GateBank, attachment: Attachment) -> None:
    """Put each gate where the layer (or module) it serves lives, for models spread over devices."""
    fused = attachment.fused
    if not fused:
        return
    granularity = gates.config.granularity
    if granularity == "model":
        gates.to(fused[0].weight.device)
        return
    for m in fused:
        gate = gates.gate(m.layer_index, m.module_key if granularity == "module" else None)
        gate.to(m.weight.device)


# ----------------------------------------------------------------------------- input groups
def share_inputs(model: nn.Module, attachment: Attachment, engine: FusionEngine) -> None:
    """Put the A stacks of fused modules that read the same input tensor (q/k/v, gate/up) into one group.

    Which modules share an input is architecture code, so it is observed, not assumed: one
    one-token forward records each fused module's input. Only a speed-up: at run time a module
    whose input is not its group's computes its own projection, and a model that cannot run the
    probe (e.g. weights on the meta device) keeps one group per module.
    """
    fused = attachment.fused
    calls: list[tuple[FusedLoraLinear, torch.Tensor]] = []
    if fused and not any(p.is_meta for p in model.parameters()):
        hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0]))) for m in fused]
        try:
            embeddings = model.get_input_embeddings()
            ids = torch.zeros(1, 1, dtype=torch.long, device=embeddings.weight.device)
            with torch.no_grad(), engine.selecting(engine.plan(FusionSpec("off"))):
                model(input_ids=ids, use_cache=False)
        except Exception:  # noqa: BLE001 - a model that cannot run the probe just keeps one group per module
            calls = []
        finally:
            for handle in hooks:
                handle.remove()
    runs: list[list[FusedLoraLinear]] = []
    for module, x in calls:
        last = runs[-1] if runs else None
        if (last and last[-1].layer_index == module.layer_index and last[-1]._probe_input is x
                and module not in last and module.group.lora_A.dtype == last[0].group.lora_A.dtype):
            last.append(module)
        else:
            runs.append([module])
        module.__dict__["_probe_input"] = x
    for module in fused:
        module.__dict__.pop("_probe_input", None)
    for run in runs:
        if len(run) > 1 and all(len(m.group.lora_A) == len(m.lora_B_t) for m in run):  # each still alone
            _group(run)
    layouts: dict[tuple, int] = {}
    for module in fused:
        key = (tuple(module.group.column_map.shape), tuple(module.group.column_map.flatten().tolist()))
        module.group.layout_key = layouts.setdefault(key, len(layouts))
    for mixer in attachment.mixers:
        mixer.set_groups([m.group for m in fused if m.layer_index == mixer.layer_index])


def _group(members: list[FusedLoraLinear]) -> None:
    lora_A = torch.cat([m.group.lora_A.detach() for m in members])
    column_map = torch.cat([m.group.column_map for m in members], dim=1)
    group = LoraInputGroup(lora_A, column_map, member_sizes=[m.lora_B_t.shape[0] for m in members])
    start = 0
    for i, m in enumerate(members):
        stop = start + m.lora_B_t.shape[0]
        m.join(group, slice(start, stop), owner=i == 0, member_index=i)
        start = stop


# ----------------------------------------------------------------------------- merged static fusions
def merge(attachment: Attachment, engine: FusionEngine, plan: FusionPlan) -> None:
    """Add the static fusion `plan` into the base weights, keeping the originals to restore bit for bit.

    The originals are kept on the CPU (a copy when the weights live elsewhere), so a merged static
    mode costs no accelerator memory; calls with another fusion subtract it (folded into the
    metadata's static weights, see FusionMetadata.fill).
    """
    quantized = [f"{type(m.base_layer).__name__} ({m.base_layer.weight.dtype})" for m in attachment.fused
                 if not mergeable(m)]
    if quantized:
        raise LoraFlowError(
            f"cannot merge a static fusion into quantized base weights ({quantized[0]}"
            f"{f' and {len(quantized) - 1} more' if len(quantized) > 1 else ''}): they are not floating point; "
            "run it unmerged (model.merge_static = False)")
    with _unfolded(attachment):
        _merge(attachment, plan)
    engine.merged, engine.merged_plan = plan.static, plan


def _merge(attachment: Attachment, plan: FusionPlan) -> None:
    unmerge(attachment)
    weights = plan.static.float().cpu()
    with torch.no_grad():
        for m in attachment.fused:
            scales = (weights @ m.group.column_map.float().cpu())[m.columns]  # (R,)
            delta = (m.lora_B.float().cpu() * scales) @ m.lora_A.float().cpu()  # (out, in)
            weight = m.base_layer.weight
            original = weight.data
            if not isinstance(m.base_layer, nn.Linear):  # GPT-2's Conv1D stores (in, out)
                delta = delta.t()
            merged = (original.float().cpu() + delta).to(dtype=original.dtype, device=original.device)
            m.__dict__["_unmerged_weight"] = original if original.device.type == "cpu" else original.cpu()
            weight.data = merged


def mergeable(module: FusedLoraLinear) -> bool:
    """Whether a static fusion can be added into the module's base weight: a plain floating-point tensor
    (not a quantized one, e.g. bitsandbytes' int8 / packed 4-bit parameters)."""
    weight = module.base_layer.weight
    return weight.is_floating_point() and type(weight) in (nn.Parameter, torch.Tensor)


def unmerge(attachment: Attachment, engine: FusionEngine | None = None) -> None:
    """Restore the base weights saved by `merge` (bit for bit)."""
    with _unfolded(attachment):
        for m in attachment.fused:
            original = m.__dict__.pop("_unmerged_weight", None)
            if original is not None:
                m.base_layer.weight.data = original.to(m.base_layer.weight.device)
    if engine is not None:
        engine.merged, engine.merged_plan = None, None


# ----------------------------------------------------------------------------- folding
def fold(attachment: Attachment) -> int:
    """Fold each input group's members' base weights and A into one buffer (`FusedLoraLinear.fold`): what
    a compiled graph runs fastest. Returns how many groups folded."""
    groups: dict[int, list[FusedLoraLinear]] = {}
    for m in attachment.fused:
        groups.setdefault(id(m.group), []).append(m)
    members = [sorted(ms, key=lambda m: m.member_index) for ms in groups.values()]
    return sum(ms[0].fold(ms) for ms in members)


def unfold(attachment: Attachment) -> list[FusedLoraLinear]:
    """Undo `fold` everywhere; returns the modules that were folded."""
    return [m for m in attachment.fused if m.unfold()]


@contextlib.contextmanager
def _unfolded(attachment: Attachment) -> Iterator[None]:
    """Base weights with storage of their own while their data is replaced (merge, unmerge); folded again after."""
    folded = [(m, m.fold_members) for m in attachment.fused if m.folded]
    unfold(attachment)
    try:
        yield
    finally:
        for owner, members in folded:
            owner.fold(members)


def add_call_hooks(module: nn.Module, engine: FusionEngine, mixers: list[LayerMixer], *,
                   outermost: bool = False) -> list:
    """Hooks that open and close one forward of `module` (fill the fusion metadata, publish the
    weights). They run in eager code only: inside a compiled graph they do nothing, so the module
    whose forward is compiled must be called through an outer one that has them (see
    `LoraFlowModel.compile`). The `outermost` module's hooks are never traced (torch.compile of that
    module runs them eagerly around its compiled forward); inner ones would break a graph if they were."""
    def begin(mod, args, kwargs):
        if is_dynamo_compiling():
            if not engine.in_call:
                raise LoraFlowError(
                    "a compiled graph runs a LoraFlowModel without filling its fusion metadata first: compile "
                    "with model.compile() or torch.compile(model) on the LoraFlowModel itself")
            return
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args and isinstance(args[0], torch.Tensor):
            x = args[0]
        batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
        device = x.device if isinstance(x, torch.Tensor) else next(mod.parameters()).device
        engine.begin_call(batch, device, mod)

    def end(mod, args, output):
        if not is_dynamo_compiling():
            engine.end_call(mixers, mod)

    if outermost:
        begin, end = torch.compiler.disable(begin), torch.compiler.disable(end)
    return [module.register_forward_pre_hook(begin, with_kwargs=True),
            module.register_forward_hook(end, always_call=True)]


def _pre_hook(mixer: LayerMixer):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            raise RuntimeError(f"decoder layer {mixer.layer_index} was called without hidden states")
        mixer.begin(hidden)

    return hook


def _post_hook(mixer: LayerMixer):
    def hook(module, args, output):
        mixer.end()

    return hook
