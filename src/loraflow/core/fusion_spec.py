"""The one mini-language that names a fusion: what `eval --method`, `generate --mode`, the
server's presets and the Python API share.

    gate | loraflow        per-token weights from the gates (LoRA-Flow)
    gate:NAME              per-token weights from the model's gate named NAME (several may be loaded)
    off  | base            the base model, adapters off
    single:NAME            one adapter alone
    avg                    equal static weights 1/k
    static:w1,w2,...       fixed weights, one per adapter, in adapter order
    lorahub                static weights found by LoRAHub's gradient-free search (evaluation only)

Pure Python, so the CLI checks a spec before loading any model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loraflow.common.errors import LoraFlowError

FUSION_HELP = "gate (LoRA-Flow), off (base), single:NAME, avg or static:w1,w2,..."
KINDS = ("gate", "off", "single", "static", "lorahub")


@dataclass(frozen=True)
class FusionSpec:
    """A parsed fusion: `kind` plus the adapter (single) or weights (static) it needs."""

    kind: str
    adapter: str | None = None
    weights: tuple[float, ...] | None = None
    gate: str | None = None  # for kind "gate": which of the model's named gates (None: its default gate)

    def __str__(self) -> str:
        if self.kind == "single":
            return f"single:{self.adapter}"
        if self.kind == "static":
            return "static:" + ",".join(f"{w:.6g}" for w in self.weights)
        if self.kind == "gate" and self.gate:
            return f"gate:{self.gate}"
        return self.kind


def parse_fusion(spec: str, adapter_names: Sequence[str], *, option: str = "fusion",
                 allow_search: bool = False) -> FusionSpec:
    """Parse `spec` against the adapters in use; a bad spec raises a one-line LoraFlowError.

    Args:
        spec: the text, e.g. "static:0.3,0.7".
        adapter_names: the adapters in gate-output order (k of them).
        option: the option or field the spec came from, for the message.
        allow_search: accept `lorahub` (only evaluation runs the search).
    """
    names = list(adapter_names)
    k = len(names)
    kind, sep, rest = str(spec).strip().partition(":")
    kind = {"loraflow": "gate", "base": "off"}.get(kind, kind)
    expected = FUSION_HELP + (" or lorahub" if allow_search else "")
    if kind in ("gate", "off", "lorahub", "avg") and not sep:
        if kind == "lorahub" and not allow_search:
            raise LoraFlowError(f"{option} {spec!r}: lorahub is a search run by `loraflow eval`; pass the "
                                "weights it found as static:w1,w2,...")
        if kind != "off" and k == 0:
            raise LoraFlowError(f"{option} {spec}: needs at least one adapter")
        if kind == "avg":
            return FusionSpec("static", weights=tuple([1.0 / k] * k))
        return FusionSpec(kind)
    if kind == "gate" and rest:
        return FusionSpec("gate", gate=rest)
    if kind == "single" and rest:
        if rest not in names:
            raise LoraFlowError(f"{option} {spec}: no adapter named {rest!r} (have {', '.join(names) or 'none'})")
        return FusionSpec("single", adapter=rest)
    if kind == "static" and rest:
        try:
            weights = tuple(float(x) for x in rest.split(","))
        except ValueError:
            raise LoraFlowError(f"{option} {spec}: weights must be numbers, e.g. static:0.5,0.5") from None
        if not all(math.isfinite(w) for w in weights):
            raise LoraFlowError(f"{option} {spec}: weights must be finite numbers")
        if len(weights) != k:
            raise LoraFlowError(f"{option} {spec}: {len(weights)} weights for {k} adapters ({', '.join(names)})")
        return FusionSpec("static", weights=weights)
    raise LoraFlowError(f"{option} {spec!r}: expected {expected}")
