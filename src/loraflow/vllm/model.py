"""LoRA-Flow models for vLLM: vLLM's own Llama model with a decoder-layer subclass that adds the fused
LoRA delta to qkv, o, gate_up and down, per token.

The layer reads the gate input where transformers' "layer input before input_layernorm" lives in vLLM:
the `residual` returned by the fused add+norm (the embeddings at layer 0), before the next fused norm
updates it in place. The per-token routing (which fusion each token's request chose) is read from
fixed buffers that the routing hook (`loraflow.vllm.runner`) fills before every forward. The formula is
`loraflow.core.fusion_math` (mixed_weights, column_scales, lora_delta): no copy here.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from loraflow.core.fusion_math import column_scales, lora_delta, mixed_weights
from loraflow.vllm.assets import FusionAssets, load_assets, read_settings
from loraflow.vllm.routing import FusionTable, RoutingBuffers
from loraflow.vllm.slicing import (column_shard, qkv_shards, row_shard, shard_column, shard_row,
                                   stack_slices)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


class StackedLora(nn.Module):
    """The k adapters of one vLLM linear, stacked (see `slicing.stack_slices`), for this rank.

    Its column map is kept (for the layer, which turns the fusion weights into every linear's column
    scales with one `column_scales` call); `forward` takes this linear's (N, R) slice of those scales.
    """

    def __init__(self, a_t: torch.Tensor, b_t: torch.Tensor, column_map: torch.Tensor, *, reduce: bool) -> None:
        super().__init__()
        self.register_buffer("a_t", a_t, persistent=False)  # (in, R)
        self.register_buffer("b_t", b_t, persistent=False)  # (R, out)
        self.column_map = column_map  # (k, R) fp32, on the CPU: stacked into the layer's map
        self.reduce = reduce  # row-parallel under TP > 1: the partial deltas are summed across ranks

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        delta = lora_delta(x, self.a_t, self.b_t, scales)  # (N, out)
        if self.reduce:
            delta = tensor_model_parallel_all_reduce(delta)
        return base_out + delta.to(base_out.dtype)


def _stacked(slices, out_sizes, in_features, k, dtype, device, *, reduce=False) -> StackedLora | None:
    stacked = stack_slices(slices, out_sizes, in_features, k, dtype)
    if stacked is None:
        return None
    return StackedLora(*(t.to(device) for t in stacked), reduce=reduce)


class LoraFlowDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer plus this layer's gates and stacked adapters."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, *, assets: FusionAssets,
                 routing: RoutingBuffers) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config)
        found = _LAYER.search(prefix)
        if found is None:
            raise ValueError(f"cannot tell the layer index from the module prefix {prefix!r}")
        layer = int(found[1])
        self.__dict__["_routing"] = routing  # shared by all layers; not a submodule of each
        device = routing.static.device
        dtype = vllm_config.model_config.dtype
        self.num_gates = len(assets.gate_names)
        self.register_buffer("gate_weight", assets.gate_weight[layer].to(device), persistent=False)  # (G, k, d)
        self.register_buffer("gate_bias", assets.gate_bias[layer].to(device), persistent=False)  # (G, k)
        self.register_buffer("gate_temperature", assets.gate_temperature.to(device), persistent=False)  # (G,)

        attn, mlp, k = self.self_attn, self.mlp, len(assets.adapters)
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        shards = qkv_shards(attn.total_num_heads, attn.total_num_kv_heads, attn.head_dim, rank, size)
        qkv = [[p and shard_column(p, s) for p in assets.pieces(layer, proj)]
               for proj, s in zip(("q_proj", "k_proj", "v_proj"), shards)]
        o_in = row_shard(attn.total_num_heads * attn.head_dim, rank, size)
        inter = mlp.gate_up_proj.output_sizes[0]
        up = column_shard(inter, rank, size)
        gate_up = [[p and shard_column(p, up) for p in assets.pieces(layer, proj)] for proj in ("gate_proj", "up_proj")]
        down_in = row_shard(inter, rank, size)
        hidden = self.hidden_size
        self.loraflow = nn.ModuleDict({name: m for name, m in {
            "qkv": _stacked(qkv, [s.size for s in shards], hidden, k, dtype, device),
            "o": _stacked([[p and shard_row(p, o_in) for p in assets.pieces(layer, "o_proj")]], [hidden], o_in.size,
                          k, dtype, device, reduce=size > 1),
            "gate_up": _stacked(gate_up, [up.size, up.size], hidden, k, dtype, device),
            "down": _stacked([[p and shard_row(p, down_in) for p in assets.pieces(layer, "down_proj")]], [hidden],
                             down_in.size, k, dtype, device, reduce=size > 1),
        }.items() if m is not None})
        self.column_splits = [m.column_map.shape[1] for m in self.loraflow.values()]
        maps = [m.column_map for m in self.loraflow.values()] or [torch.zeros(k, 0)]
        self.register_buffer("column_map", torch.cat(maps, dim=1).to(device), persistent=False)  # (k, R_layer)

    def column_scales(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each adapted linear's (N, R) column scales, from one (N, k) @ (k, R_layer) product."""
        scales = column_scales(weights, self.column_map)
        return dict(zip(self.loraflow.keys(), torch.split(scales, self.column_splits, dim=-1)))

    def _add(self, name: str, x: torch.Tensor, out: torch.Tensor, scales: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loraflow[name](x, out, scales[name]) if name in self.loraflow else out

    def fusion_weights(self, layer_input: torch.Tensor) -> torch.Tensor:
        """(N, k) per-token weights from this step's routing buffers and the layer input (N, d)."""
        n = layer_input.shape[0]
        routing = self._routing
        if self.num_gates == 0:
            return routing.static[:n]
        return mixed_weights(layer_input, routing.static[:n], routing.select[:n], self.gate_weight, self.gate_bias,
                             self.gate_temperature)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        # the gate reads `residual` now, before the next fused norm updates it in place
        scales = self.column_scales(self.fusion_weights(residual))

        attn = self.self_attn
        qkv, _ = attn.qkv_proj(hidden_states)
        qkv = self._add("qkv", hidden_states, qkv, scales)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        attn_out = attn.attn(q, k, v)
        out, _ = attn.o_proj(attn_out)
        hidden_states = self._add("o", attn_out, out, scales)

        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        mlp = self.mlp
        gate_up, _ = mlp.gate_up_proj(hidden_states)
        gate_up = self._add("gate_up", hidden_states, gate_up, scales)
        act = mlp.act_fn(gate_up)
        out, _ = mlp.down_proj(act)
        return self._add("down", act, out, scales), residual


def _max_step_tokens(vllm_config: VllmConfig) -> int:
    sizes = getattr(vllm_config.compilation_config, "cudagraph_capture_sizes", None) or [0]
    return max(int(vllm_config.scheduler_config.max_num_batched_tokens), max(sizes))


class LoraFlowLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with LoRA-Flow decoder layers; the adapters and gates are those the model
    directory's config.json `loraflow` block names (see `loraflow.vllm.prepare`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        settings = read_settings(hf_config)
        assets = load_assets(settings, hf_config.num_hidden_layers, hf_config.hidden_size)
        routing = RoutingBuffers(_max_step_tokens(vllm_config), len(assets.adapters), len(assets.gate_names))
        layer_type = functools.partial(LoraFlowDecoderLayer, assets=assets, routing=routing)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.loraflow_routing = routing
        self.loraflow_table = FusionTable(assets.adapter_names, assets.gate_names, assets.default_fusion)

    def loraflow_route(self, fusions: list[str | None], tokens_per_request: list[int]) -> None:
        """Fill this step's routing buffers: request j (in batch order) has `tokens_per_request[j]` tokens."""
        self.loraflow_routing.fill(self.loraflow_table, fusions, tokens_per_request)
