"""The LoRA-Flow formula as pure tensor functions, shared by every engine.

No modules, no state, no Python branches on tensor values: the transformers engine
(`loraflow.core`) and the vLLM plugin both call these, and `torch.compile` traces them whole.
What varies per call (which rows use which gate, static weights) arrives as tensors:

    static  (..., k)   constant weights per token (zeros on gate rows; one-hot for one adapter)
    select  (..., G)   how much of gate g's output each token takes (one-hot on gate rows, else 0)

so a token's fusion weights are  w = static + sum_g select_g * (softmax(W_g x / T_g) + b_g),
and every adapted linear module of the layer adds  sum_i w_i * s_i * B_i A_i x  to its base output.

Shapes: `...` is any leading token dimensions ((N,) flattened, or (B, T)), d the hidden size, k
adapters, G gates, R stacked rank columns (r_1 + ... + r_k), `in`/`out` a module's features.
"""

from __future__ import annotations

import torch


def gate_weights(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 temperature: float | torch.Tensor = 1.0, top_k: int | None = None) -> torch.Tensor:
    """One gate: softmax(hidden W^T / T) + b, the bias added after the softmax as in the paper.

    With `top_k` below k, each token keeps its k largest logits: the softmax runs over them and only
    the kept adapters get their bias; the others weigh 0 (see `keep_top`).

    Args:
        hidden: (..., d) the hidden state entering the layer (before its input norm).
        weight: (k, d); bias: (k,) or (1, k); temperature: a float or a 0-d tensor; top_k: None for all.

    Returns:
        (..., k) in the gate's dtype.
    """
    logits = torch.nn.functional.linear(hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype), weight)
    if not (isinstance(temperature, float) and temperature == 1.0):  # x / 1.0 == x: skip the op
        logits = logits / temperature
    bias = bias if logits.dim() > 1 and bias.dim() <= 2 else bias.reshape(-1)
    return _softmax_plus_bias(logits, bias, None if top_k is None or top_k >= logits.shape[-1] else top_k)


def _softmax_plus_bias(logits: torch.Tensor, bias: torch.Tensor, top_k: int | torch.Tensor | None) -> torch.Tensor:
    """softmax(logits) + bias over the last dimension; with `top_k`, over each token's kept logits only, the
    others weighing 0 (their bias not added)."""
    if top_k is None:
        return torch.softmax(logits, dim=-1) + bias
    kept = keep_top(logits, top_k)
    return torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1) + bias * kept


def keep_top(logits: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """(..., k) bool: which logits are among their token's `top_k` largest (ties at the k-th value kept too).
    `top_k`: an int, or a (G,) tensor of one per gate when logits are (..., G, k)."""
    ordered = logits.sort(dim=-1, descending=True).values
    if isinstance(top_k, int):
        kth = ordered[..., top_k - 1:top_k]
    else:
        index = (top_k.to(torch.long) - 1).view(-1, 1).expand(*ordered.shape[:-1], 1)
        kth = ordered.gather(-1, index)
    return logits >= kth


def mixed_weights(hidden: torch.Tensor, static: torch.Tensor, select: torch.Tensor,
                  gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                  temperature: torch.Tensor, top_k: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token fusion weights from per-token data: static + sum_g select_g * gate_g(hidden).

    Args:
        hidden: (..., d).
        static: (..., k) or broadcastable to it (e.g. (B, 1, k) per row, (k,) for all).
        select: (..., G) or broadcastable; 0/1 for routing (any value scales that gate's output).
        gate_weight: (G, k, d); gate_bias: (G, k); temperature: (G,); top_k: (G,) integers, or None when
            every gate keeps all k (see `gate_weights`).

    Returns:
        (..., k) float32 weights. Every gate runs on every token (G*k*d multiply-adds per token, a
        rounding error next to the layer): a fixed graph whatever the routing.
    """
    x = hidden.to(gate_weight.dtype)
    if torch.compiler.is_compiling():  # a multiply-and-sum that the compiler fuses with what follows it
        logits = (x.unsqueeze(-2).unsqueeze(-2) * gate_weight).sum(-1)
    else:  # eager: one batched matmul, no (..., G, k, d) intermediate
        logits = torch.einsum("...d,gkd->...gk", x, gate_weight)
    logits = logits / temperature.unsqueeze(-1)  # (..., G, k)
    probs = _softmax_plus_bias(logits, gate_bias, top_k)  # (..., G, k)
    gated = (select.to(probs.dtype).unsqueeze(-1) * probs).sum(dim=-2)  # (..., k)
    return gated + static.to(gated.dtype)


def column_scales(weights: torch.Tensor, column_map: torch.Tensor) -> torch.Tensor:
    """Per-token scale of each stacked rank column: (..., k) @ (k, R) -> (..., R).

    column_map[i, j] = lora_alpha_i / r_i where column j belongs to adapter i, else 0; so column j
    of adapter i gets w_i * s_i.
    """
    weights = weights if weights.dtype == column_map.dtype else weights.to(column_map.dtype)
    if torch.compiler.is_compiling():  # k multiply-adds per column: fused into the ops around it, no matmul call
        return (weights.unsqueeze(-1) * column_map).sum(-2)
    return weights @ column_map


def lora_delta(x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i x for stacked adapters: ((x @ A^T) * scales) @ B^T.

    Args:
        x: (..., in); a_t: (in, R) the stacked A transposed; b_t: (R, out) the stacked B transposed;
        scales: (..., R) or broadcastable (from `column_scales`).

    Returns:
        (..., out) in the adapters' dtype.
    """
    h = x.to(a_t.dtype) @ a_t  # (..., R)
    return (h * scales.to(h.dtype)) @ b_t


def fused_linear(x: torch.Tensor, base_out: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
                 weights: torch.Tensor, column_map: torch.Tensor) -> torch.Tensor:
    """A fused module's output: base_out + lora_delta(x, ..., column_scales(weights, column_map)).

    Args:
        x: (..., in); base_out: (..., out) = W0 x (+ bias); weights: (..., k) (or broadcastable).
    """
    delta = lora_delta(x, a_t, b_t, column_scales(weights, column_map))
    return base_out + delta.to(base_out.dtype)


def scaled_projection(x: torch.Tensor, a_t: torch.Tensor, scales: torch.Tensor, *,
                      inplace: bool = False) -> torch.Tensor:
    """The first half of `lora_delta` for a group of modules sharing one input: (x @ A^T) * scales.

    Args:
        x: (..., in); a_t: (in, R) the group's stacked A transposed; scales: (..., R) or broadcastable.
        inplace: scale the fresh product in place (inference: one allocation fewer).

    Returns:
        (..., R) in the adapters' dtype.
    """
    h = torch.matmul(x if x.dtype == a_t.dtype else x.to(a_t.dtype), a_t)
    scales = scales if scales.dtype == h.dtype else scales.to(h.dtype)
    return h.mul_(scales) if inplace else h * scales


def add_lora_output(base_out: torch.Tensor, h: torch.Tensor, b_t: torch.Tensor, *,
                    inplace: bool = False) -> torch.Tensor:
    """The second half of `lora_delta`: base_out + h @ B^T.

    Args:
        base_out: (..., out).
        h: (..., R) scaled (from `scaled_projection`) flattened to (N, R) over base_out's N tokens,
            with b_t (R, out); or one row's (1, T, R) with b_t as a (1, R, out) view (a batched matmul).
        inplace: accumulate into base_out (inference; base_out contiguous and of h's dtype) with one
            addmm / baddbmm, saving an allocation and an add.
    """
    if not inplace:
        return base_out + (h @ b_t).to(base_out.dtype).view(base_out.shape)
    if b_t.dim() == 3:
        return base_out.baddbmm_(h, b_t)
    base_out.view(-1, base_out.shape[-1]).addmm_(h, b_t)
    return base_out


def add_scaled_lora(base_out: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """base_out + (h * scales) @ B^T in one addmm, for an engine that computed the base output and the
    A projection h = x @ A^T in one matrix multiply (A's rows appended to the base weight).

    Args:
        base_out: (N, out); h: (N, R); scales: (N, R) or broadcastable (from `column_scales`);
        b_t: (R, out).

    Returns:
        (N, out) in base_out's dtype.
    """
    scaled = h * (scales if scales.dtype == h.dtype else scales.to(h.dtype))
    return torch.addmm(base_out, scaled.to(b_t.dtype), b_t).to(base_out.dtype)


def stack_static_lora(a_list: list[torch.Tensor], b_list: list[torch.Tensor],
                      scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A static mix sum_i c_i B_i A_i as ONE LoRA of rank sum(r_i) (A rows stacked, B columns stacked,
    each adapter's columns times its c_i): what any engine that serves plain LoRAs can run exactly.

    Args:
        a_list: per adapter (r_i, in); b_list: per adapter (out, r_i); scales: per adapter c_i
            (its fusion weight times its lora_alpha / r).

    Returns:
        (A (R, in), B (out, R)) with B @ A = sum_i c_i B_i A_i.
    """
    a = torch.cat(list(a_list), dim=0)
    b = torch.cat([b_i * float(c) for b_i, c in zip(b_list, scales)], dim=1)
    return a, b
