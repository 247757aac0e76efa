"""The fused multi-LoRA linear layer: one frozen base linear plus k stacked LoRA adapters.

The k adapters of a module are stacked along the rank axis, so the adapter path costs two
matrix multiplies whatever k is:

    h = dropout(x) @ A_stack^T                 (..., R)      R = r_1 + ... + r_k
    h = h * (w[adapter_of_column] * s_column)  per token: column j of adapter i gets w_i * s_i
    y = base(x) + h @ B_stack^T                (..., out)     (B_stack^T is what we store)

Modules of one decoder layer that read the same input tensor (q/k/v; gate/up) keep their A
stacks in one `LoraInputGroup`, so the first matrix multiply (and the scaling) runs once for
all of them; each module then adds its own columns of h through its own B.

Where the per-token weights w come from is not this layer's business: it asks its layer's mixer
(see `loraflow.core.attach`) for its scaled h, which is None when adapters are off.

For compiled graphs a group can be folded (`FusedLoraLinear.fold`): its members' base weights and its
A stack in one buffer, the base weights views of it, so one matrix multiply yields every member's
base output and the group's h.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from loraflow.core.fusion_math import add_lora_output

# True only while torch.compile traces (dynamo constant-folds it); a plain `return False` in eager,
# the cheapest check on a per-token path. torch.compiler.is_compiling on torch without it.
is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


def _hook_free(module: nn.Module) -> bool:
    """True when calling `module` would run its plain `forward` (no hooks of any kind, no patched forward)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


class LoraSource(Protocol):
    def lora_hidden(self, layer: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor | None: ...


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"unsupported module type {type(module).__name__} (need nn.Linear or Conv1D)")


class LoraInputGroup(nn.Module):
    """The stacked A matrices of the fused modules (of one layer) that read the same input.

    Args:
        lora_A: (R_group, in), the members' A stacks one after another.
        column_map: (k, R_group) float, column_map[i, j] = scale of column j if it belongs to
            adapter i, else 0; so per-token column scales are one small matmul: w @ column_map.
        layout_key: equal for groups with equal column maps (their scales can be shared).
        member_sizes: the columns of each member module, in order (default: one member).
    """

    def __init__(self, lora_A: torch.Tensor, column_map: torch.Tensor, layout_key: int = 0,
                 member_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.member_sizes = list(member_sizes or [lora_A.shape[0]])
        if sum(self.member_sizes) != lora_A.shape[0]:
            raise ValueError(f"member sizes {self.member_sizes} do not add up to {lora_A.shape[0]} columns")
        self.shared = len(self.member_sizes) > 1
        self.layer_position = 0  # index among its layer's groups (set by the layer's mixer)
        # held transposed, (in, R_group): x (N, in) @ lora_A_t is then one plain matmul, no transpose op
        self.lora_A_t = nn.Parameter(lora_A.t().contiguous(), requires_grad=False)
        self.register_buffer("column_map", column_map.float(), persistent=False)
        self.layout_key = layout_key

    def _apply(self, fn, recurse: bool = True):
        """Move with the model, but keep the column scales in fp32 whatever `model.to(dtype)` asks:
        alpha / r (e.g. 1/3) must not be rounded to bf16 before it multiplies fp32 gate weights."""
        column_map = self.column_map
        super()._apply(fn, recurse)
        self.column_map = column_map.to(device=self.lora_A_t.device, dtype=torch.float32)
        return self

    @property
    def lora_A(self) -> torch.Tensor:
        """(R_group, in), a view."""
        return self.lora_A_t.t()

    def extra_repr(self) -> str:
        return f"in={self.lora_A_t.shape[0]}, rank_columns={self.lora_A_t.shape[1]}"


class FusedLoraLinear(nn.Module):
    """A frozen base linear with k stacked, frozen LoRA adapters mixed by external weights.

    Args:
        base_layer: the original nn.Linear / Conv1D, left untouched (`weight`, `bias` are its own).
        lora_A: (R, in_features), the adapters' A matrices concatenated along rows.
        lora_B: (out_features, R), the adapters' B matrices concatenated along columns.
        adapter_index: (R,) long, which adapter each rank column belongs to.
        scaling: (R,) float, that adapter's lora_alpha / r for each column.
        num_adapters: k, including adapters that do not touch this module (they contribute 0).
        dropout: LoRA dropout on the input, active in training mode only: one p for every adapter, or one
            per adapter (k values); each adapter draws its own mask, as PEFT's per-adapter dropout does.
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
        self.__dict__["_base"] = base_layer  # plain reference: nn.Module.__getattr__ is slow per token
        self._plain_linear = type(base_layer) is nn.Linear
        self.in_features, self.out_features = in_features, out_features
        self.num_adapters = num_adapters
        self.module_key = module_key
        self.layout_key = layout_key
        # B is held transposed, (R, out) contiguous: the second matmul then streams it row by row,
        # which is measurably faster at decode (BENCHMARKS.md).
        self.lora_B_t = nn.Parameter(lora_B.t().contiguous(), requires_grad=False)  # (R, out)
        self.register_buffer("adapter_index", adapter_index.long(), persistent=False)
        self.register_buffer("scaling", scaling.float(), persistent=False)
        ps = [float(dropout)] * num_adapters if isinstance(dropout, (int, float)) else [float(x) for x in dropout]
        self.dropout_p = tuple(ps)
        # nn.Dropout at the largest p marks "dropout is on" (and shows in the repr); masks come from dropout_p
        self.lora_dropout = nn.Dropout(max(ps)) if max(ps, default=0.0) > 0 else nn.Identity()
        self.has_dropout = max(ps, default=0.0) > 0
        counts = torch.bincount(adapter_index.long(), minlength=num_adapters).tolist()
        self._adapter_runs = [(i, n) for i, n in enumerate(counts) if n]  # columns are stacked adapter by adapter
        column_map = torch.zeros(num_adapters, lora_A.shape[0])
        column_map[adapter_index.long(), torch.arange(lora_A.shape[0])] = scaling.float()
        self.lora_group = LoraInputGroup(lora_A, column_map)  # a group of one until attach regroups
        self.__dict__["group"] = self.lora_group  # plain reference: every member of a group holds one
        self.columns = slice(0, lora_A.shape[0])  # this module's columns in its group
        self.member_index = 0  # its place among its group's members
        self.mixer: LoraSource | None = None  # set by loraflow.core.attach; not a submodule

    def join(self, group: LoraInputGroup, columns: slice, *, owner: bool, member_index: int) -> None:
        """Read A from `group` (columns `columns`, its member `member_index`); the owner registers the
        group as its submodule."""
        del self.lora_group
        if owner:
            self.lora_group = group
        self.__dict__["group"] = group
        self.columns = columns
        self.member_index = member_index

    @property
    def lora_A(self) -> torch.Tensor:
        """The stacked A matrices, (R, in_features) (a view into the input group's)."""
        return self.group.lora_A_t[:, self.columns].t()

    @property
    def lora_B(self) -> torch.Tensor:
        """The stacked B matrices in PEFT's (out_features, R) orientation (a view)."""
        return self.lora_B_t.t()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def ranks(self) -> list[int]:
        """Rank of each adapter in this module (0 where an adapter does not touch it)."""
        return torch.bincount(self.adapter_index, minlength=self.num_adapters).tolist()

    # ----------------------------------------------------------------- folding (compiled graphs)
    @property
    def folded(self) -> bool:
        """Whether this module holds its input group's fold (see `fold`)."""
        return self._buffers.get("folded_weight") is not None

    def can_fold(self) -> bool:
        """A hook-free floating-point nn.Linear whose weight lives with its group's A."""
        weight = self.base_layer.weight
        return (self._plain_linear and _hook_free(self.base_layer)
                and type(weight) is nn.Parameter and weight.is_floating_point() and not weight.is_meta
                and self.group.lora_A_t.dtype == weight.dtype and self.group.lora_A_t.device == weight.device)

    def fold(self, members: list[FusedLoraLinear]) -> bool:
        """Put the base weights of the input group's `members` (this module first, in member order) and a
        copy of the group's stacked A into one buffer, [W_1; ...; W_n; A], of which each member's base
        weight becomes a view: a compiled graph then gets every member's base output and the group's A
        projection from one matrix multiply (q/k/v and their adapters: one library call instead of
        four). Weights and Parameters keep their values and identity; A is held twice. Returns whether
        it folded (every member must `can_fold`)."""
        if self.folded:
            return True
        if members[0] is not self or not all(m.can_fold() and m.group is self.group for m in members):
            return False
        weight, a = self.base_layer.weight, self.group.lora_A
        rows = sum(m.out_features for m in members) + a.shape[0]
        self.register_buffer("folded_weight", torch.empty(rows, self.in_features, dtype=weight.dtype,
                                                          device=weight.device), persistent=False)
        self.__dict__["fold_split"] = [m.out_features for m in members] + [a.shape[0]]
        self.__dict__["fold_members"] = list(members)
        for m in members:
            m.__dict__["fold_owner"] = self
        self.refold()
        return True

    def refold(self) -> None:
        """Copy into the buffer whatever is not a view of it (a member weight replaced or moved) and make
        it one again; A is copied afresh."""
        buffer, start = self.folded_weight, 0
        with torch.no_grad():
            for m in self.__dict__["fold_members"]:
                weight, rows = m.base_layer.weight, buffer[start:start + m.out_features]
                if weight.data_ptr() != rows.data_ptr() or weight.dtype != rows.dtype or weight.device != rows.device:
                    rows.copy_(weight)
                    weight.data = rows
                start += m.out_features
            buffer[start:].copy_(self.group.lora_A)
        self.__dict__["fold_stamp"] = self._fold_sources()

    def _fold_sources(self) -> tuple:
        """What the fold was taken from: each member's weight storage (a view of the buffer after a fold) and
        A's storage and version counter (bumped by every in-place change, `load_state_dict` included)."""
        a = self.__dict__["group"]._parameters["lora_A_t"]  # dict lookups: this runs before every compiled call
        return (a.data_ptr(), a._version,
                *[m.__dict__["_base"]._parameters["weight"].data_ptr() for m in self.__dict__["fold_members"]])

    def refresh_fold(self) -> bool:
        """Take the weights in again if any was replaced (`weight.data = ...`, `load_state_dict(assign=True)`)
        or A changed since the fold (a compiled graph reads the fold, not them). Returns whether it refolded."""
        if self.__dict__.get("fold_stamp") == self._fold_sources():
            return False
        self.refold()
        return True

    def unfold(self) -> bool:
        """Undo `fold`: each member's base weight gets storage of its own again (the same values). Returns
        whether this module held a fold."""
        if not self.folded:
            return False
        for m in self.__dict__.pop("fold_members"):
            m.base_layer.weight.data = m.base_layer.weight.data.clone()
            m.__dict__.pop("fold_owner", None)
        del self._buffers["folded_weight"]
        self.__dict__.pop("fold_stamp", None)
        return True

    def _apply(self, fn, recurse: bool = True):
        """Move with the model. A folded member's base weight is moved on its own by its base layer (and
        the members are moved one by one), so after each move the fold takes the weights in again."""
        super()._apply(fn, recurse)
        owner = self.__dict__.get("fold_owner")
        if owner is not None and owner.folded:
            owner.refold()
        return self

    def _folded_forward(self, x: torch.Tensor, owner: FusedLoraLinear) -> torch.Tensor:
        """In a compiled graph: the owner computes every member's base output and the group's projection in
        one matmul and hands them to the layer's mixer; the other members take theirs from it."""
        mixer = self.mixer
        if self is owner and mixer.wants_projection(self, x):
            parts = F.linear(x, self.folded_weight).split(self.fold_split, dim=-1)
            outputs = [p if m.base_layer.bias is None else p + m.base_layer.bias
                       for p, m in zip(parts, self.fold_members)]
            mixer.keep_projection(self, x, parts[-1], outputs)
            return outputs[0]
        result = mixer.base_output(self, x)
        return self.base_layer(x) if result is None else result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixer = self.mixer
        compiling = mixer.compiling if mixer is not None else is_dynamo_compiling()  # read once per layer
        if compiling:
            owner = self.__dict__.get("fold_owner")
            result = self.base_layer(x) if owner is None or mixer is None else self._folded_forward(x, owner)
        else:
            base = self._base
            if self._plain_linear and _hook_free(base):
                # what nn.Linear's own call would run, without its module-call overhead
                params = base._parameters
                result = F.linear(x, params["weight"], params["bias"])
            else:
                result = base(x)
        h = mixer.lora_hidden(self, x) if mixer is not None else None  # (1, T, R) or (N, R), scaled; or None
        if h is None:
            return result
        # _parameters[...] rather than self.lora_B_t: nn.Module.__getattr__ is slow on a per-token path
        b_t = self.lora_B_t if compiling else self._parameters["lora_B_t"]
        if h.dim() == 3:  # one row's (1, T, R): a batched matmul against B as (1, R, out)
            b_t = b_t.unsqueeze(0) if compiling else self._batched_b(b_t)
        inplace = not torch.is_grad_enabled() and result.dtype == h.dtype and result.is_contiguous()
        return add_lora_output(result, h, b_t, inplace=inplace)

    def _batched_b(self, b_t: torch.Tensor) -> torch.Tensor:
        """B as (1, R, out): a view made once (again if the parameter's storage was replaced, e.g. by .to())."""
        b3 = self.__dict__.get("_b3")
        if b3 is None or b3.data_ptr() != b_t.data_ptr() or b3.requires_grad != b_t.requires_grad:
            b3 = self.__dict__["_b3"] = b_t.unsqueeze(0)
        return b3

    def project_with_dropout(self, x: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        """(N, R) = x @ A^T for this module's columns `a_t` (in, R), each adapter's columns from its own
        dropout mask of its own p (training), as PEFT applies one dropout module per adapter."""
        if not self.training:
            return torch.mm(x, a_t)
        parts, start = [], 0
        for adapter, n in self._adapter_runs:
            p = self.dropout_p[adapter]
            parts.append(torch.mm(F.dropout(x, p, training=True) if p > 0 else x, a_t[:, start:start + n]))
            start += n
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        shared = self.group.lora_A_t.shape[1] != self.lora_B_t.shape[0]
        return (f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, k={self.num_adapters}"
                + (f", A shared with its input group (columns {self.columns.start}:{self.columns.stop})"
                   if shared else ""))
