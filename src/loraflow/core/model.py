"""LoraFlowModel: a Hugging Face causal LM with k LoRA adapters fused per token by trained gates.

    model = LoraFlowModel.from_pretrained("base", adapters={"zh": "lora-zh", "math": "lora-math"},
                                          gate="zh_math.pt")
    model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=64)

Modes (explicit and reversible): gates (default), static weights (Avg / LoRAHub baselines), one
adapter alone, or adapters off, all over the same fused layers.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from loraflow.core.adapters import load_adapter
from loraflow.core.attach import (
    Attachment,
    add_call_hooks,
    attach_adapters,
    fold,
    hidden_size,
    merge,
    mergeable,
    num_hidden_layers,
    place_gates,
    unmerge,
)
from loraflow.common.checks import check_positive
from loraflow.common.errors import LoraFlowError
from loraflow.core.checkpoints import (
    check_finite,
    is_official_gate_file,
    load_gate_checkpoint,
    load_official_gate,
    resolve_gate,
    save_gate_checkpoint,
)
from loraflow.core.devices import resolve_device
from loraflow.core.fused_linear import is_dynamo_compiling
from loraflow.core.fusion_context import FusionEngine, FusionPlan
from loraflow.core.fusion_spec import FusionSpec, parse_fusion
from loraflow.core.gate import GateBank, GateConfig
from loraflow.core.guards import compile_kwargs

AdapterSpec = Mapping[str, "str | os.PathLike"] | Sequence[tuple[str, "str | os.PathLike"]]
_GATE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class LoraFlowModel(nn.Module):
    """A base causal LM, k frozen LoRA adapters in fused layers, and trainable fusion gates.

    Build with `from_pretrained`. `forward` and `generate` have the transformers contract.
    Only `gate_parameters()` (the default gate's) are trainable; gates added with `add_gate` are
    frozen and selected per call with `fusion(FusionSpec("gate", gate=NAME))` or per row.

    The default fusion (set_gate_mode, set_static_weights, ...) is per-model configuration;
    `fusion(spec)` and `fusion_rows(specs)` choose a fusion for the forwards run inside them in
    the current thread (or asyncio task) only, so concurrent callers do not interfere.

    A static default (single, avg, static:...) is merged into the base weights in eval mode, so it
    runs at the base model's speed; the original weights are kept (on the CPU) and restored bit for
    bit when the mode changes. Set `merge_static = False` to skip that (no copy kept). Quantized
    (non-floating-point) base weights are never merged: static fusions run unmerged on them.
    """

    def __init__(self, model: nn.Module, gates: GateBank, engine: FusionEngine, attachment: Attachment) -> None:
        super().__init__()
        self.model = model
        self.gates = gates
        self.extra_gates = nn.ModuleDict()  # gates added with add_gate, by name (frozen)
        self._engine = engine
        self._attachment = attachment
        self.merge_static = True
        # filling the fusion metadata happens here, in eager code, even when the forward is compiled
        self._call_hooks = add_call_hooks(self, engine, attachment.mixers, outermost=True)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | nn.Module,
        adapters: AdapterSpec,
        gate: str | os.PathLike | None = None,
        *,
        temperature: float | None = None,
        torch_dtype: torch.dtype | str | None = None,
        granularity: str = "layer",
        device: str | torch.device | None = None,
        gate_init_std: float = 1e-3,
        gate_bias_init: Sequence[float] | None = None,
        seed: int | None = None,
        gate_name: str = "default",
        gate_top_k: int | None = None,
        **model_kwargs,
    ) -> LoraFlowModel:
        """Load a base model, k PEFT LoRA adapters (in the given order) and a gate.

        Args:
            base: a model directory / hub name, or an already-built transformers model.
            adapters: {name: adapter_dir} in gate-output order (for the official gates: language first,
                then task), or a list of (name, dir) pairs.
            gate: a loraflow gate directory, an official `.pt` gate file, or None for a fresh gate
                (small random W; bias [-0.5, 0.5] for k=2 as the authors initialise).
            temperature: softmax temperature; default the gate's own (1.0 for fresh/official gates).
            torch_dtype: dtype for base and adapters (gates stay fp32).
            granularity: for a fresh gate: "layer" (default), "model" or "module".
            device: where to put the model (default: where transformers loads it, i.e. CPU).
            seed: seeds the fresh gate's random initialisation.
            gate_name: the name of this gate among the model's gates (see `add_gate`).
            gate_top_k: for a fresh gate: keep each token's top-k adapters (see `GateConfig.top_k`); None: all.

        Raises:
            LoraFlowError: missing/corrupt files, adapters that do not fit the base, a gate that does
                not match the adapters or the model, an unknown architecture, or k = 0.
        """
        _check_gate_name(gate_name)
        torch_dtype = check_torch_dtype(torch_dtype)
        if temperature is not None:
            try:
                temperature = check_positive("temperature", temperature)
            except ValueError as e:
                raise LoraFlowError(f"--{e}") from None
        pairs = list(adapters.items()) if isinstance(adapters, Mapping) else [tuple(p) for p in adapters]
        if not pairs:
            raise LoraFlowError("no adapters given: LoRA-Flow fuses k >= 1 LoRA adapters")
        names = [str(n) for n, _ in pairs]
        if len(set(names)) != len(names):
            raise LoraFlowError(f"duplicate adapter names: {names}")
        if device is not None:
            device = resolve_device(str(device))
        if gate is not None:
            gate = resolve_gate(gate)
        loaded = [load_adapter(name, path) for name, path in pairs]  # fail on bad adapters before the base
        model = load_base(base, torch_dtype, model_kwargs)
        if device is not None:
            model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)

        n_layers, d = num_hidden_layers(model), hidden_size(model)
        summaries = [a.summary() for a in loaded]
        if gate is None:
            config = _make_config(names, d, n_layers, 1.0 if temperature is None else temperature, granularity, model,
                                  None, summaries, gate_top_k)
            state_dict = None
        elif is_official_gate_file(gate):
            official_n, k, official_d, state_dict = load_official_gate(gate)
            _check_official(gate, official_n, k, official_d, names, n_layers, d)
            _check_top_k(gate, None, gate_top_k, len(names))  # the authors' gates are dense
            config = _make_config(names, d, n_layers, 1.0 if temperature is None else temperature, "layer", model,
                                  None, summaries)
        else:
            config, state_dict = load_gate_checkpoint(gate)
            _check_config(gate, config, names, n_layers, d, model)
            _check_top_k(gate, config.top_k, gate_top_k, len(names))
            if temperature is not None:
                config.temperature = float(temperature)

        engine = FusionEngine(n_layers, names)
        attachment = attach_adapters(model, loaded, engine)
        if config.granularity == "module" and gate is None:
            config.module_keys = attachment.module_keys
        elif config.granularity == "module" and config.module_keys != attachment.module_keys:
            raise LoraFlowError(f"{gate}: module-level gate was trained for other adapted modules")
        gates = GateBank(config)
        if state_dict is None:
            if seed is not None:
                torch.manual_seed(seed)
            gates.reset_parameters(std=gate_init_std, bias=tuple(gate_bias_init) if gate_bias_init else None)
        else:
            _load_gate_state(gates, state_dict, gate)
        place_gates(gates, attachment)
        engine.add_gate(gate_name, gates)
        engine.default_gate = gate_name
        engine.set_default(engine.plan(FusionSpec("gate")))
        return cls(model, gates, engine, attachment).train(model.training)

    # ----------------------------------------------------------------- the transformers contract
    def forward(self, *args, **kwargs):
        if is_dynamo_compiling():
            return self.model(*args, **kwargs)
        try:
            return self.model(*args, **kwargs)
        except BaseException:
            self._engine.abandon()  # a KeyboardInterrupt skips the end hooks: do not leave the model locked
            raise

    def generate(self, *args, **kwargs):
        if self.compiled:
            kwargs.setdefault("disable_compile", True)  # compiled already; transformers would compile __call__
            if kwargs.get("past_key_values") is None:
                kwargs.setdefault("cache_implementation", "static")  # fixed shapes while decoding
        try:
            return self.model.generate(*args, **kwargs)
        except BaseException:
            self._engine.abandon()
            raise

    def compile(self, *, fullgraph: bool = True, guards: str = "tensors", **kwargs) -> LoraFlowModel:
        """Compile the transformers model's forward with `torch.compile` (fullgraph by default); returns self.

        The fusion is data (tensors filled before each forward, outside the graph), so switching
        fusions (`fusion`, `fusion_rows`, the setters) never recompiles; new shapes do (prefill
        lengths, batch sizes), as for any compiled model. Pair it with a static KV cache
        (`generate(..., cache_implementation="static")`) for shapes that stay fixed while decoding.
        On CUDA, `mode="reduce-overhead"` also captures CUDA graphs. Extra keyword arguments go to
        `torch.compile` (e.g. `backend`, `mode`, `dynamic`).

        It also folds each input group (q/k/v, gate/up, ...): its members' base weights and its stacked A
        in one buffer (`FusedLoraLinear.fold`), so the graph computes all their base outputs and A x in
        one matrix multiply; the base weights keep their values.

        `guards="tensors"` (the default) has dynamo check, before each call, every tensor's shape, dtype
        and device, the training flags and this model's gate set, not the ~12,000 facts about its
        modules (3 ms a step on SmolLM2-135M, see `loraflow.core.guards`): swap a module or register
        a hook by hand after compiling and call `compile()` again. `guards="all"` keeps them all.
        """
        engine = self._engine
        kwargs = compile_kwargs(guards, kwargs, pinned=lambda: (engine.graph_key,))  # its guard: kept by value
        fold(self._attachment)
        self._engine.new_graph_key()
        owners = [m for m in self._attachment.fused if m.folded]
        previous = self.__dict__.pop("_fold_refresh", None)
        if previous is not None:
            previous.remove()
        # the folds are derived data: before every call, taken in again from weights changed since
        self.__dict__["_fold_refresh"] = self.model.register_forward_pre_hook(_fold_refresher(owners))
        self.__dict__["_compiled_forward"] = compile_forward(self.model, fullgraph=fullgraph, **kwargs)
        return self

    @property
    def compiled(self) -> bool:
        """Whether `compile()` was called."""
        compiled = self.__dict__.get("_compiled_forward")
        return compiled is not None and self.model.__dict__.get("forward") is compiled

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def gate_config(self) -> GateConfig:
        return self.gates.config

    @property
    def adapter_names(self) -> list[str]:
        return list(self.gates.config.adapter_names)

    @property
    def temperature(self) -> float:
        return self.gates.config.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.gates.set_temperature(value)

    # ----------------------------------------------------------------- gates
    def gate_parameters(self) -> list[nn.Parameter]:
        """The only trainable parameters: every gate's W and b."""
        return list(self.gates.parameters())

    def num_gate_parameters(self) -> int:
        return sum(p.numel() for p in self.gates.parameters())

    def freeze_all_but_gates(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.gates.parameters():
            p.requires_grad_(True)

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.gates.state_dict().items()}

    @property
    def gate_names(self) -> list[str]:
        """Names of the model's gates; the first is the default gate (`model.gates`)."""
        return list(self._engine.gates)

    def add_gate(self, name: str, gate: str | os.PathLike | GateBank) -> None:
        """Add another gate over the same adapters, selectable per call or per row by `name`.

        Args:
            name: letters, digits, '_' or '-'; not already used.
            gate: a loraflow gate directory, an official `.pt` gate file, or a GateBank.

        Raises:
            LoraFlowError: a bad or taken name, or a gate that does not fit the adapters or the model.
        """
        _check_gate_name(name)
        if name in self._engine.gates:
            raise LoraFlowError(f"gate name '{name}' is taken; gates are {', '.join(self.gate_names)}")
        d, n = self.gates.config.hidden_size, self.gates.config.num_layers
        keys = self._attachment.module_keys
        if isinstance(gate, GateBank):
            bank = gate
            _check_config(f"'{name}'", bank.config, self.adapter_names, n, d, self.model)
            if bank.config.granularity == "module" and bank.config.module_keys != keys:
                raise LoraFlowError(f"gate '{name}': module-level gate was made for other adapted modules")
        else:
            if is_official_gate_file(gate):
                on, k, od, state = load_official_gate(gate)
                _check_official(gate, on, k, od, self.adapter_names, n, d)
                config = GateConfig.from_dict({**self.gates.config.to_dict(), "granularity": "layer",
                                               "temperature": 1.0, "module_keys": None})
            else:
                config, state = load_gate_checkpoint(gate)
                _check_config(gate, config, self.adapter_names, n, d, self.model)
                if config.granularity == "module" and config.module_keys != keys:
                    raise LoraFlowError(f"{gate}: module-level gate was trained for other adapted modules")
            bank = GateBank(config)
            _load_gate_state(bank, state, gate)
        place_gates(bank, self._attachment)
        for p in bank.parameters():
            p.requires_grad_(False)
        self.extra_gates[name] = bank
        self._engine.add_gate(name, bank)

    def load_gate(self, path: str | os.PathLike) -> None:
        """Load gate weights from a loraflow gate directory or an official `.pt` file into this model."""
        d, n = self.gates.config.hidden_size, self.gates.config.num_layers
        k = len(self.adapter_names)
        mine = self.gates.config.top_k or k
        if is_official_gate_file(path):
            on, gk, od, state = load_official_gate(path)
            _check_official(path, on, gk, od, self.adapter_names, n, d)
            _check_top_k(path, None, mine, k)
        else:
            config, state = load_gate_checkpoint(path)
            _check_config(path, config, self.adapter_names, n, d, self.model)
            if config.granularity != self.gates.config.granularity:
                raise LoraFlowError(
                    f"{path}: {config.granularity}-level gate, but this model has {self.gates.config.granularity}-level gates"
                )
            _check_top_k(path, config.top_k, mine, k)
        _load_gate_state(self.gates, state, path)

    def save_gate(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """Save the gates (config + safetensors) to `out_dir`, atomically."""
        return save_gate_checkpoint(out_dir, self.gates.config, self.gates.state_dict(), extra=extra)

    # ----------------------------------------------------------------- fusion modes
    @property
    def fusion_mode(self) -> str:
        """The default fusion's kind: "gate", "static" or "off"."""
        return self._engine.default.label

    def set_gate_mode(self, gate: str | None = None) -> None:
        """Per-token weights from the gates (LoRA-Flow): the default gate, or the gate named `gate`."""
        self._set_default(FusionSpec("gate", gate=gate))

    def set_static_weights(self, weights: Sequence[float] | Mapping[str, float] | torch.Tensor) -> None:
        """Use the same weight per adapter for every token and layer (Avg, LoRAHub, single LoRA)."""
        self._set_default(FusionSpec("static", weights=tuple(self._weights_tensor(weights).tolist())))

    def set_single_adapter(self, name: str) -> None:
        """Only adapter `name`, at its own scale (a one-hot static weight)."""
        self.set_static_weights({n: float(n == name) for n in self._check_name(name)})

    def set_adapters_off(self) -> None:
        """The base model alone."""
        self._set_default(FusionSpec("off"))

    def set_fusion(self, spec: str | FusionSpec) -> None:
        """Switch to the fusion a spec names: gate, gate:NAME, off, single:NAME, avg or static:w1,w2,..."""
        spec = self._spec(spec)
        if spec.kind == "single":
            self.set_single_adapter(spec.adapter)
        else:
            self._set_default(spec)

    def _set_default(self, spec: FusionSpec) -> None:
        self._engine.set_default(self._engine.plan(spec, self.device))
        self._sync_merge()

    def _sync_merge(self) -> None:
        """Merge the default fusion into the base weights when it is static (eval mode); else unmerge."""
        plan = self._engine.default
        if (self.merge_static and not self.training and plan.label == "static"
                and all(mergeable(m) for m in self._attachment.fused)):  # quantized weights run unmerged
            if self._engine.merged_plan is not plan:
                merge(self._attachment, self._engine, plan)
        elif self._engine.merged is not None:
            unmerge(self._attachment, self._engine)

    def train(self, mode: bool = True) -> LoraFlowModel:
        super().train(mode)
        if "_engine" in self.__dict__:
            self._sync_merge()  # training (LoRA dropout, gradients) runs unmerged
        return self

    @property
    def merged(self) -> bool:
        """Whether a static fusion is merged into the base weights right now."""
        return self._engine.merged is not None

    def _spec(self, spec: str | FusionSpec) -> FusionSpec:
        return spec if isinstance(spec, FusionSpec) else parse_fusion(spec, self.adapter_names)

    @contextlib.contextmanager
    def fusion(self, spec: str | FusionSpec) -> Iterator[None]:
        """Use `spec` for every forward / generate inside the block, in this thread only.

        The thread-safe alternative to the setters: the model's default is left alone.
        """
        with self._engine.selecting(self._engine.plan(self._spec(spec), self.device)):
            yield

    @contextlib.contextmanager
    def fusion_rows(self, specs: Sequence[str | FusionSpec]) -> Iterator[None]:
        """Row i of every batch run inside the block uses fusion specs[i] (in this thread only).

        Gate rows get their gate's per-token weights, static rows constants, single rows one
        adapter, off rows none; every forward inside must have len(specs) rows.
        """
        plan = self._engine.row_plan([self._spec(s) for s in specs], self.device)
        with self._engine.selecting(plan):
            yield

    @contextlib.contextmanager
    def static_weights(self, weights) -> Iterator[None]:
        """Temporarily use static weights; the previous mode is restored on exit."""
        with self._restoring():
            self.set_static_weights(weights)
            yield

    @contextlib.contextmanager
    def only_adapter(self, name: str) -> Iterator[None]:
        with self._restoring():
            self.set_single_adapter(name)
            yield

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        with self._restoring():
            self.set_adapters_off()
            yield

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        saved: FusionPlan = self._engine.default
        try:
            yield
        finally:
            self._engine.set_default(saved)
            self._sync_merge()

    def _check_name(self, name: str) -> list[str]:
        if name not in self.adapter_names:
            raise LoraFlowError(f"unknown adapter '{name}'; adapters are {', '.join(self.adapter_names)}")
        return self.adapter_names

    def _weights_tensor(self, weights) -> torch.Tensor:
        names = self.adapter_names
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise LoraFlowError(f"unknown adapter(s) {unknown}; adapters are {', '.join(names)}")
            weights = [float(weights.get(n, 0.0)) for n in names]
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != len(names):
            raise LoraFlowError(f"got {w.numel()} static weights for {len(names)} adapters ({', '.join(names)})")
        return w.to(self.device)

    # ----------------------------------------------------------------- inspection
    @property
    def last_fusion_weights(self) -> torch.Tensor | None:
        """Gate weights of this thread's last forward: (num_layers, batch, tokens, k), or None if no gate ran.

        Rows with a constant fusion (fusion_rows) show their constants.
        """
        ws = self._engine.last_weights()
        if not ws or any(w is None for w in ws):
            return None
        return torch.stack(ws)

    @contextlib.contextmanager
    def record_fusion_weights(self) -> Iterator[list[torch.Tensor]]:
        """Collect the gate weights of every forward inside the block (e.g. each generate step).

        Yields a list that, on exit, holds one (num_layers, batch, tokens, k) tensor per forward;
        `torch.cat(frames, dim=2)` gives the per-token weights of a whole generation.
        """
        frames: list[torch.Tensor] = []
        with self._engine.recording() as raw:
            try:
                yield frames
            finally:
                frames.extend(torch.stack(f) for f in raw if f and all(w is not None for w in f))

    def detach_adapters(self) -> nn.Module:
        """Undo the attachment: restore the original modules and weights, remove the hooks, return the base model."""
        self._attachment.detach(self._engine)
        for handle in self._call_hooks:
            handle.remove()
        self.model.__dict__.pop("forward", None)  # compile()
        return self.model


def _fold_refresher(owners: list) -> Callable:
    """A forward pre-hook (never traced) refreshing each folded group from weights changed since its fold."""
    @torch.compiler.disable
    def refresh(module, args) -> None:
        for owner in owners:
            if owner.folded:
                owner.refresh_fold()

    return refresh


def compile_forward(model: nn.Module, *, fullgraph: bool = True, **kwargs):
    """Replace `model.forward` (on the instance) by `torch.compile` of it; its hooks stay eager. Returns it."""
    forward = type(model).forward.__get__(model)
    compiled = model.__dict__["forward"] = torch.compile(forward, fullgraph=fullgraph, **kwargs)
    return compiled


def _check_gate_name(name: str) -> None:
    if not isinstance(name, str) or not _GATE_NAME.match(name):
        raise LoraFlowError(f"gate name {name!r}: use letters, digits, '_' or '-'")


def split_gguf(base, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub name, GGUF file name or None) for a base given as `X.gguf` or `DIR` + `gguf_file`.

    transformers reads a GGUF checkpoint as `from_pretrained(DIR, gguf_file=NAME)`; loraflow also
    accepts the file's own path everywhere a base is accepted.
    """
    text = os.fspath(base)
    if gguf_file:
        return text, os.fspath(gguf_file)
    if text.lower().endswith(".gguf"):
        path = Path(text)
        if not path.is_file():
            raise LoraFlowError(f"{path}: GGUF file not found")
        return str(path.parent), path.name
    return text, None


def _require_gguf(source: str, gguf_file: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise LoraFlowError(
            f"{Path(source) / gguf_file}: reading a GGUF checkpoint needs the `gguf` package (pip install gguf)"
        )
    if Path(source).is_dir() and not (Path(source) / gguf_file).is_file():
        raise LoraFlowError(f"{Path(source) / gguf_file}: GGUF file not found")


def _gguf_of(model: nn.Module) -> str | None:
    """The GGUF file an in-memory model was loaded from by `load_base`, if any."""
    return getattr(model, "_loraflow_gguf", None)


def load_tokenizer(base, *, gguf_file: str | None = None):
    """The tokenizer saved with `base`: a model directory, hub name, `.gguf` file (or DIR + `gguf_file`),
    or an in-memory model loaded by `load_base` from one of those."""
    from transformers import AutoTokenizer

    if isinstance(base, nn.Module):
        gguf = _gguf_of(base)
        base = gguf or getattr(base.config, "name_or_path", None)
        if not base:
            raise LoraFlowError("pass tokenizer= when the base model is an in-memory module")
    source, gguf_file = split_gguf(base, gguf_file)
    kwargs = {}
    if gguf_file:
        _require_gguf(source, gguf_file)
        kwargs["gguf_file"] = gguf_file
    try:
        with _quiet_loading():
            return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        where = Path(source) / gguf_file if gguf_file else source
        raise LoraFlowError(f"{where}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def check_torch_dtype(torch_dtype) -> torch.dtype | str | None:
    """`torch_dtype` as a floating torch dtype, "auto" or None; a name such as "bfloat16" is looked up in torch.

    Raises:
        LoraFlowError: anything else (a misspelt name, a non-floating dtype), naming the value given.
    """
    if torch_dtype is None or torch_dtype == "auto":
        return torch_dtype
    dtype = getattr(torch, torch_dtype.removeprefix("torch."), None) if isinstance(torch_dtype, str) else torch_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LoraFlowError(f"torch_dtype {torch_dtype!r}: expected a floating torch dtype such as torch.bfloat16, "
                            "a name such as 'float16', or 'auto'")
    return dtype


def load_base(base, torch_dtype=None, model_kwargs: Mapping | None = None) -> nn.Module:
    """A transformers causal LM in eval mode from a directory, hub name or `.gguf` file.

    A GGUF checkpoint (`X.gguf`, or a directory with `model_kwargs["gguf_file"]`) is dequantised by
    transformers; it needs the `gguf` package. An `nn.Module` is returned as it is.

    Raises:
        LoraFlowError: a missing path, a directory without config.json, a missing `gguf` package,
            or a checkpoint transformers cannot load as a causal LM.
    """
    torch_dtype = check_torch_dtype(torch_dtype)
    if isinstance(base, nn.Module):
        return base
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_kwargs or {})
    source, gguf_file = split_gguf(base, kwargs.pop("gguf_file", None))
    path = Path(source)
    if not path.exists() and (os.environ.get("HF_HUB_OFFLINE") == "1" or source.startswith((".", "/"))):
        raise LoraFlowError(f"{source}: base model directory not found")
    if gguf_file:
        _require_gguf(source, gguf_file)
        # Dense weights: the fused layers wrap plain nn.Linear, and LoRA training needs a trainable base.
        kwargs["gguf_file"] = gguf_file
        try:
            from transformers import GgufConfig
        except ImportError:  # transformers < 5.23 has no GgufConfig and always dequantises GGUF files
            pass
        else:
            kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    elif path.is_dir() and not (path / "config.json").is_file():
        raise LoraFlowError(f"{path}: no config.json (not a transformers model directory)")
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    where = path / gguf_file if gguf_file else source
    from safetensors import SafetensorError

    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as e:  # unknown model_type / architecture
        raise LoraFlowError(f"{where}: cannot load as a causal LM ({_first_line(e)})") from None
    except PermissionError as e:
        raise LoraFlowError(f"{e.filename or where}: cannot read the base model (permission denied)") from None
    except OSError as e:
        raise LoraFlowError(f"{where}: cannot load the base model ({_first_line(e)})") from None
    except (SafetensorError, RuntimeError, EOFError, UnicodeDecodeError) as e:  # truncated or corrupt weights
        raise LoraFlowError(f"{where}: corrupt or truncated model weights ({_first_line(e)})") from None
    check_finite(dict(model.named_parameters()), where)
    if gguf_file:
        _drop_gguf_quantizer(model)
        model._loraflow_gguf = str(where)  # so load_tokenizer(model) finds the same file
    return model.eval()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A dequantised GGUF model is an ordinary dense model: forget the quantizer, so that it can be
    saved (`save_pretrained`) and trained like one."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide third-party loading bars (GGUF dequantisation uses a bare tqdm) unless transformers'
    progress bars are on, i.e. unless the user asked for verbose output."""
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        yield
        return
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _make_config(names, d, n, temperature, granularity, model, module_keys, summaries, top_k=None) -> GateConfig:
    try:
        return GateConfig(
            top_k=top_k,
            adapter_names=names, hidden_size=d, num_layers=n, temperature=temperature, granularity=granularity,
            base_model=getattr(model.config, "name_or_path", None) or None,
            model_type=getattr(model.config, "model_type", None),
            module_keys=module_keys if module_keys is not None else ([] if granularity == "module" else None),
            adapters=summaries,
        )
    except ValueError as e:
        raise LoraFlowError(str(e)) from None


def _check_top_k(path, found: int | None, wanted: int | None, k: int) -> None:
    """A gate file's top-k must be the one asked for (None and k both mean all k): a bank's k is fixed when it is
    built, so weights trained with one k are never run with another."""
    if wanted is not None and (found or k) != (wanted or k):
        raise LoraFlowError(f"{path}: a gate trained with top-k {found or k}, but top-k {wanted} was asked for")


def _check_official(path, n, k, d, names, model_layers, model_hidden) -> None:
    problems = []
    if k != len(names):
        problems.append(f"it mixes {k} adapters but {len(names)} were given ({', '.join(names)})")
    if n != model_layers:
        problems.append(f"it has {n} layers but the base model has {model_layers}")
    if d != model_hidden:
        problems.append(f"its hidden size is {d} but the base model's is {model_hidden}")
    if problems:
        raise LoraFlowError(f"gate {path} does not match: " + "; ".join(problems))


def _check_config(path, config: GateConfig, names, model_layers, model_hidden, model) -> None:
    problems = []
    if config.adapter_names != names:
        if sorted(config.adapter_names) == sorted(names):
            problems.append(f"adapter order is {','.join(config.adapter_names)} but {','.join(names)} was given")
        else:
            problems.append(f"it was trained for adapters {','.join(config.adapter_names)}, not {','.join(names)}")
    if config.num_layers != model_layers:
        problems.append(f"it has {config.num_layers} layers but the base model has {model_layers}")
    if config.hidden_size != model_hidden:
        problems.append(f"its hidden size is {config.hidden_size} but the base model's is {model_hidden}")
    model_type = getattr(model.config, "model_type", None)
    if config.model_type and model_type and config.model_type != model_type:
        problems.append(f"it was trained on a {config.model_type} model, this is {model_type}")
    if problems:
        raise LoraFlowError(f"gate {path} does not match: " + "; ".join(problems))


def _load_gate_state(gates: GateBank, state: dict[str, torch.Tensor], source) -> None:
    """Load exactly the gate keys, collecting every missing/unexpected/mis-shaped key into one error."""
    expected = gates.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    if misshaped:
        problems.append(f"mis-shaped {misshaped[:4]}{'...' if len(misshaped) > 4 else ''}")
    if problems:
        raise LoraFlowError(f"gate {source}: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(v.dtype))
