"""Which of dynamo's guards a compiled LoraFlowModel keeps (`LoraFlowModel.compile(guards=...)`).

Before every call of a compiled forward, dynamo checks the facts the graph was traced under. For a
LoRA-Flow model on SmolLM2-135M (k=2) that is about 14,000 guards, twice the base model's 6,600, most of
them facts about modules (their types, their empty hook dicts, attributes that are None): 3.0 ms per
decode step on one CPU thread, against the base model's 1.3 ms (measured with torch.profiler's "TorchDynamo
Cache Lookup", one compiled model per process). Keeping the tensor guards and a few flags takes 1.5 ms.

`"tensors"` keeps:
- every tensor guard: shape, dtype, device, strides (so `model.to(...)` or a new batch size retraces);
- tensors reached by two paths (tied weights);
- the `training` and activation-checkpointing flags of every module;
- everything outside the model (globals, grad mode, the inputs);
- the fusion engine's `graph_key`: a new one for every `compile()` and every gate added, and one per
  model, so two models never share a graph. It is kept by its value (`pinned`, the key object itself),
  not by how dynamo names the guard.

It drops the other facts about modules: a module swapped, or a hook registered, by hand after `compile()`
is not seen until the next `compile()`. `"all"` keeps every guard (torch's default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from loraflow.common.errors import LoraFlowError

GUARD_MODES = ("tensors", "all")
_KEPT_ATTRIBUTES = (".training", ".gradient_checkpointing")


def keep_tensor_guards(entries: Sequence, pinned: Callable[[], tuple] = tuple) -> list[bool]:
    """A `guard_filter_fn` for `torch.compile`: which of `entries` (torch._dynamo GuardFilterEntry) to keep.
    A guard on any object of `pinned()` (compared by identity) is always kept."""
    import torch

    values = pinned()
    keep = []
    for entry in entries:
        source = entry.orig_guard.source
        keep.append(
            source is None or not source.is_unspecialized_nn_module()
            or entry.guard_type == "TENSOR_MATCH"
            or (entry.guard_type == "DUPLICATE_INPUT" and isinstance(entry.value, torch.Tensor))
            or entry.name.endswith(_KEPT_ATTRIBUTES)
            or (entry.has_value and any(entry.value is v for v in values)))
    return keep


def compile_kwargs(guards: str, kwargs: dict, pinned: Callable[[], tuple] = tuple) -> dict:
    """`torch.compile` keyword arguments `kwargs` with the guard filter of `guards` ("tensors" or "all")
    added to its `options` (torch takes a `mode` or `options`, not both: a mode becomes its options);
    guards on the objects `pinned()` returns when dynamo builds them are always kept."""
    if guards not in GUARD_MODES:
        raise LoraFlowError(f"guards={guards!r}: choose one of {', '.join(GUARD_MODES)}")
    if guards == "all":
        return kwargs
    kwargs = dict(kwargs)
    mode = kwargs.pop("mode", None)
    named_mode = mode not in (None, "default")
    if named_mode and kwargs.get("backend", "inductor") != "inductor":
        return {**kwargs, "mode": mode}  # a mode of another backend: no options beside it
    options = dict(kwargs.pop("options", None) or {})
    if named_mode:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode, kwargs.get("dynamic")), **options}
    options.setdefault("guard_filter_fn", functools.partial(keep_tensor_guards, pinned=pinned))
    kwargs["options"] = options
    return kwargs
