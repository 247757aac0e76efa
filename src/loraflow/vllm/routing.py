"""Each request's fusion as routing rows, and the per-step routing buffers the model's layers read.

A fusion becomes two rows (see `loraflow.core.fusion_math`): `static` (k,) constant weights and `select`
(G,) which gate's output the token takes. gate[:NAME] -> select one-hot, static 0; single:NAME -> static
one-hot; static:w / avg -> static w; off -> zeros. Before each forward the routing hook writes one row per
scheduled token into fixed buffers (filled in place, so compiled graphs read data, not Python state).
Zero rows are a valid fusion (`off`), so each real step checks that it was filled (`RoutingBuffers.check_step`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from loraflow.common.errors import LoraFlowError
from loraflow.core.fusion_spec import FusionSpec, parse_fusion
from loraflow.vllm.versions import SUPPORTED_RANGE

FUSION_KEY = "fusion"  # SamplingParams.extra_args / vllm_xargs field
ROWS_CACHED = 4096  # parsed fusions kept per FusionTable
SALT_PREFIX = "loraflow-fusion-"  # + a hash of the canonical spec (vLLM: <= 128 chars, no "/", "@", "\\")


class FusionTable:
    """Parses fusion specs against a model's adapters and gates; caches each spec's routing rows.

    Args:
        adapter_names: the adapters in gate-output order (k).
        gate_names: the model's gates (G); the first is what `gate` means.
        default_fusion: the fusion of requests that name none.
    """

    def __init__(self, adapter_names: Sequence[str], gate_names: Sequence[str], default_fusion: str = "gate") -> None:
        self.adapter_names = list(adapter_names)
        self.gate_names = list(gate_names)
        self._rows: OrderedDict[str, tuple[tuple[float, ...], tuple[float, ...]]] = OrderedDict()  # LRU
        self.default_fusion = self.canonical(default_fusion)

    def parse(self, spec: str) -> FusionSpec:
        """The FusionSpec `spec` names, with a bare `gate` resolved to the default gate's name.

        Raises:
            LoraFlowError: a malformed spec, an unknown adapter or gate, or a gate on a model without gates.
        """
        parsed = parse_fusion(spec, self.adapter_names)
        if parsed.kind == "gate":
            if not self.gate_names:
                raise LoraFlowError(f"fusion {spec!r}: this model has no gates (have adapters "
                                    f"{', '.join(self.adapter_names)}; use single:NAME, static:... or off)")
            name = parsed.gate or self.gate_names[0]
            if name not in self.gate_names:
                raise LoraFlowError(f"fusion {spec!r}: no gate named {name!r} (have {', '.join(self.gate_names)})")
            return FusionSpec("gate", gate=name)
        return parsed

    def canonical(self, spec: str | None) -> str:
        """One spelling per fusion (`gate` -> `gate:NAME`, `avg` -> `static:...`, `base` -> `off`)."""
        if spec is None:
            return self.default_fusion
        return str(self.parse(spec))

    def cache_salt(self, spec: str | None) -> str:
        """The prefix-cache salt of a fusion: requests share cached KV blocks only with the same fusion."""
        return fusion_salt(self.canonical(spec))

    def rows(self, spec: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(static (k,), select (G,)) for a fusion spec (None: the default fusion)."""
        key = self.default_fusion if spec is None else str(spec)
        found = self._rows.get(key)
        if found is not None:
            self._rows.move_to_end(key)
        else:
            parsed = self.parse(key)
            static = [0.0] * len(self.adapter_names)
            select = [0.0] * len(self.gate_names)
            if parsed.kind == "gate":
                select[self.gate_names.index(parsed.gate)] = 1.0
            elif parsed.kind == "single":
                static[self.adapter_names.index(parsed.adapter)] = 1.0
            elif parsed.kind == "static":
                static = list(parsed.weights)
            found = self._rows[key] = (tuple(static), tuple(select))
            if len(self._rows) > ROWS_CACHED:  # every static weight vector is a key: bounded, least recent first out
                self._rows.popitem(last=False)
        return found


def fusion_salt(canonical_spec: str) -> str:
    """The cache salt of a canonical fusion spec (see `FusionTable.canonical`)."""
    import hashlib

    return SALT_PREFIX + hashlib.sha256(canonical_spec.encode("utf-8")).hexdigest()[:32]


def fusion_of(extra_args: dict | None) -> str | None:
    """The fusion a request names in its extra_args (None: the model's default)."""
    if not extra_args or extra_args.get(FUSION_KEY) is None:
        return None
    return str(extra_args[FUSION_KEY])


class RoutingBuffers(torch.nn.Module):
    """Per-token routing data for one step: static (max_tokens, k) and select (max_tokens, G), fp32.

    Rows past the step's tokens are zero (padding tokens run as `off`). `fills` counts the steps routed;
    `check_step` (before each real step's forward) refuses a step that was not, as unfilled rows would
    silently run every request as `off`.
    """

    def __init__(self, max_tokens: int, num_adapters: int, num_gates: int) -> None:
        super().__init__()
        self.register_buffer("static", torch.zeros(max_tokens, num_adapters), persistent=False)
        self.register_buffer("select", torch.zeros(max_tokens, num_gates), persistent=False)
        self._filled = 0
        self.fills = 0  # plain ints: the per-step check costs no tensor work
        self._checked = 0

    def fill(self, table: FusionTable, fusions: Sequence[str | None], tokens_per_request: Sequence[int]) -> None:
        """Write request j's rows into its `tokens_per_request[j]` consecutive token positions, in order."""
        counts = torch.as_tensor(list(tokens_per_request), dtype=torch.long)
        n = int(counts.sum())
        if n > self.static.shape[0]:
            raise RuntimeError(f"{n} tokens in one step but the routing buffers hold {self.static.shape[0]}")
        rows = [table.rows(f) for f in fusions]
        static = torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(len(rows), -1)
        select = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(len(rows), -1)
        self.static[:n].copy_(static.repeat_interleave(counts, dim=0))
        self.select[:n].copy_(select.repeat_interleave(counts, dim=0))
        if self._filled > n:
            self.static[n:self._filled].zero_()
            self.select[n:self._filled].zero_()
        self._filled = n
        self.fills += 1

    def check_step(self) -> None:
        """Before a real step's forward: the buffers must have been filled since the previous step's check.

        Raises:
            LoraFlowError: no `fill` since the last check (the routing hook did not run for this step).
        """
        if self.fills == self._checked:
            raise LoraFlowError(f"this vLLM step's LoRA-Flow routing was never written (the plugin's hook on "
                                f"GPUModelRunner._prepare_inputs did not run for it), so every request would run "
                                f"as fusion 'off'; run the plugin on vllm{SUPPORTED_RANGE} with vLLM's V1 model "
                                f"runner (VLLM_USE_V2_MODEL_RUNNER=0), whose steps it routes")
        self._checked = self.fills
