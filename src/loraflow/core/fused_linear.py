"""The fused multi-LoRA linear layer: one frozen base linear plus k stacked LoRA adapters.

The k adapters of a module are stacked along the rank axis, so the adapter path costs two
matrix multiplies whatever k is:

    h = dropout(x) @ A_stack^T                 (..., R)      R = r_1 + ... + r_k
    h = h * (w[adapter_of_column] * s_column)  per token: column j of adapter i gets w_i * s_i
    y = base(x) + h @ B_stack^T                (..., out)     (B_stack^T is what we store)

Where the per-token weights w come from is not this layer's business: it asks its layer's mixer
(see `loraflow.core.attach`), which returns the per-column scales or None when adapters are off.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class ColumnScaleSource(Protocol):
    def column_scales(self, layer: FusedLoraLinear) -> torch.Tensor | None: ...


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"unsupported module type {type(module).__name__} (need nn.Linear or Conv1D)")


class FusedLoraLinear(nn.Module):
    """A frozen base linear with k stacked, frozen LoRA adapters mixed by external weights.

    Args:
        base_layer: the original nn.Linear / Conv1D, left untouched.
        lora_A: (R, in_features), the adapters' A matrices concatenated along rows.
        lora_B: (out_features, R), the adapters' B matrices concatenated along columns.
        adapter_index: (R,) long, which adapter each rank column belongs to.
        scaling: (R,) float, that adapter's lora_alpha / r for each column.
        num_adapters: k, including adapters that do not touch this module (they contribute 0).
        dropout: LoRA dropout on the input, active in training mode only.
        module_key: this module's name inside its decoder layer (e.g. "self_attn.q_proj").
        layout_key: equal for modules whose adapter_index and scaling are equal.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        adapter_index: torch.Tensor,
        scaling: torch.Tensor,
        *,
        num_adapters: int,
        dropout: float = 0.0,
        module_key: str = "",
        layout_key: int = 0,
    ) -> None:
        super().__init__()
        in_features, out_features = linear_dims(base_layer)
        if lora_A.shape[1] != in_features or lora_B.shape[0] != out_features:
            raise ValueError(
                f"LoRA shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit a "
                f"{in_features}->{out_features} layer"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.num_adapters = num_adapters
        self.module_key = module_key
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)  # (R, in)
        # B is held transposed, (R, out) contiguous: the second matmul then streams it row by row,
        # which is measurably faster at decode (BENCHMARKS.md).
        self.lora_B_t = nn.Parameter(lora_B.t().contiguous(), requires_grad=False)  # (R, out)
        self.register_buffer("adapter_index", adapter_index.long(), persistent=False)
        self.register_buffer("scaling", scaling.float(), persistent=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Modules with the same (adapter, rank, scale) column layout share one per-token scale
        # tensor in their layer's mixer; the attacher numbers the layouts with small ints.
        self.layout_key = layout_key
        self.mixer: ColumnScaleSource | None = None  # set by loraflow.core.attach; not a submodule

    @property
    def ranks(self) -> list[int]:
        """Rank of each adapter in this module (0 where an adapter does not touch it)."""
        counts = torch.bincount(self.adapter_index, minlength=self.num_adapters)
        return counts.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        scales = self.mixer.column_scales(self) if self.mixer is not None else None
        if scales is None:
            return result
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., R)
        h = h * scales  # (..., R) * (..., R) or (R,)
        if not torch.is_grad_enabled() and result.dtype == h.dtype and result.is_contiguous():
            # inference: accumulate into the base output, saving one allocation and one add
            result.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B_t)
            return result
        return result + (h @ self.lora_B_t).to(result.dtype)  # (..., out)

    @property
    def lora_B(self) -> torch.Tensor:
        """The stacked B matrices in PEFT's (out_features, R) orientation (a view)."""
        return self.lora_B_t.t()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}"
