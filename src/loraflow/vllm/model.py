"""LoRA-Flow models for vLLM: vLLM's own Llama, Mistral and Qwen2 models with decoder-layer subclasses that
add the fused LoRA delta to qkv, o, gate_up and down, per token (one fused forward, `FusedDecoderLayer`,
mixed into each of vLLM's layer classes).

The layer reads the gate input where transformers' "layer input before input_layernorm" lives in vLLM:
the `residual` returned by the fused add+norm (the embeddings at layer 0), before the next fused norm
updates it in place. The per-token routing (which fusion each token's request chose) is read from
fixed buffers that the routing hook (`loraflow.vllm.runner`) fills before every forward; a model refuses,
when built, a model runner that would not (see `runner.check_runner`). The formula is
`loraflow.core.fusion_math` (mixed_weights, column_scales, add_scaled_lora): no copy here. Each adapted
linear's stacked A is appended to its base weight once loaded, so the base matrix multiply also yields A x.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix

from loraflow.core.fusion_math import add_scaled_lora, column_scales, lora_delta, mixed_weights
from loraflow.vllm.architectures import check_settings
from loraflow.vllm.assets import FusionAssets, load_assets, read_settings
from loraflow.vllm.routing import FusionTable, RoutingBuffers
from loraflow.vllm.runner import check_runner, loading_runner
from loraflow.vllm.slicing import (column_shard, qkv_shards, row_shard, shard_column, shard_row,
                                   stack_slices)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


class StackedLora(nn.Module):
    """The k adapters of one vLLM linear, stacked (see `slicing.stack_slices`), for this rank.

    Its column map is kept (for the layer, which turns the fusion weights into every linear's column
    scales with one `column_scales` call); `forward` takes this linear's (N, R) slice of those scales.
    After `fold_into`, A's rows sit under the base weight, so the base linear's one matrix multiply
    returns [W0 x | A x] and `forward` adds the delta with one more (an addmm).
    """

    def __init__(self, a_t: torch.Tensor, b_t: torch.Tensor, column_map: torch.Tensor, *, reduce: bool) -> None:
        super().__init__()
        self.register_buffer("a_t", a_t, persistent=False)  # (in, R)
        self.register_buffer("b_t", b_t, persistent=False)  # (R, out)
        self.column_map = column_map  # (k, R) fp32, on the CPU: stacked into the layer's map
        self.reduce = reduce  # row-parallel under TP > 1: the partial deltas are summed across ranks
        self.base_out = 0  # after `fold_into`: the base linear's own outputs (those after them are A x)
        self.folded_reduce = reduce

    def fold_into(self, linear: nn.Module) -> bool:
        """Append A's rows to an unquantized linear's loaded weight (and zeros to its bias), before vLLM
        prepares it for its kernels; False, changing nothing, for other linears (they keep their own A
        projection). Row-parallel: the linear's all-reduce then sums the partial A x with its output.
        A stays here (`a_t`), the source every fold is derived from (see `unfold_from`)."""
        if self.base_out:  # already folded: derive A's rows again
            self.unfold_from(linear)
        weight = getattr(linear, "weight", None)
        if (not isinstance(getattr(linear, "quant_method", None), UnquantizedLinearMethod)
                or not isinstance(weight, torch.Tensor) or weight.dim() != 2):
            return False
        a = self.a_t.t().to(device=weight.device, dtype=weight.dtype)
        self.base_out = weight.shape[0]
        weight.data = torch.cat([weight.data, a], dim=0)
        bias = getattr(linear, "bias", None)
        if bias is not None:
            bias.data = torch.cat([bias.data, bias.data.new_zeros(a.shape[0])])
        self.folded_reduce, self.reduce = self.reduce, False
        return True

    def unfold_from(self, linear: nn.Module) -> None:
        """Give the linear back its base weight and bias (A's rows and their zero biases cut off), so that
        weights can be loaded into it again (vLLM's loaders expect the checkpoint's shapes); fold again after."""
        if not self.base_out:
            return
        n, self.base_out = self.base_out, 0
        linear.weight.data = linear.weight.data[:n].clone()
        bias = getattr(linear, "bias", None)
        if bias is not None:
            bias.data = bias.data[:n].clone()
        self.reduce = self.folded_reduce

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if self.base_out:  # base_out is [W0 x | A x]
            n = self.base_out
            return add_scaled_lora(base_out[..., :n], base_out[..., n:], scales, self.b_t)
        delta = lora_delta(x, self.a_t, self.b_t, scales)  # (N, out)
        if self.reduce:
            delta = tensor_model_parallel_all_reduce(delta)
        return base_out + delta.to(base_out.dtype)


def _stacked(slices, out_sizes, in_features, k, dtype, device, *, reduce=False) -> StackedLora | None:
    stacked = stack_slices(slices, out_sizes, in_features, k, dtype)
    if stacked is None:
        return None
    return StackedLora(*(t.to(device) for t in stacked), reduce=reduce)


class FusedDecoderLayer:
    """LoRA-Flow on one of vLLM's Llama-family decoder layers: this layer's gates and stacked adapters, and
    the fused forward. Mixed in before vLLM's layer class (Llama, Mistral, Qwen2), whose attention, MLP and
    norms it reuses: they all hold qkv_proj/o_proj/rotary_emb/attn and gate_up_proj/act_fn/down_proj and
    run the same fused add+norm structure (settings under which they do more are refused, see
    `loraflow.vllm.architectures`).

    Args (keyword, besides the vLLM layer's own): assets, the model's adapters and gates; routing, the
    step's routing buffers (shared by all layers); dtype, the model's dtype.
    """

    def __init__(self, *, prefix: str, assets: FusionAssets, routing: RoutingBuffers, dtype: torch.dtype,
                 **layer_kwargs) -> None:
        super().__init__(prefix=prefix, **layer_kwargs)
        found = _LAYER.search(prefix)
        if found is None:
            raise ValueError(f"cannot tell the layer index from the module prefix {prefix!r}")
        layer = int(found[1])
        self.__dict__["_routing"] = routing  # shared by all layers; not a submodule of each
        device = routing.static.device
        self.num_gates = len(assets.gate_names)
        self.register_buffer("gate_weight", assets.gate_weight[layer].to(device), persistent=False)  # (G, k, d)
        self.register_buffer("gate_bias", assets.gate_bias[layer].to(device), persistent=False)  # (G, k)
        self.register_buffer("gate_temperature", assets.gate_temperature.to(device), persistent=False)  # (G,)
        top_k = assets.gate_top_k
        self.register_buffer("gate_top_k", None if top_k is None else top_k.to(device), persistent=False)  # (G,)

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

    def _adapted_linears(self) -> dict[str, nn.Module]:
        attn, mlp = self.self_attn, self.mlp
        return {"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj}

    def fold_adapters(self) -> None:
        """Once the weights are loaded: each stacked A goes under its base linear's weight (see
        `StackedLora.fold_into`), so one matrix multiply per linear yields both W0 x and A x."""
        linears = self._adapted_linears()
        for name, stacked in self.loraflow.items():
            stacked.fold_into(linears[name])

    def unfold_adapters(self) -> None:
        """Before weights are loaded again: the linears get the checkpoint's shapes back (`unfold_from`)."""
        linears = self._adapted_linears()
        for name, stacked in self.loraflow.items():
            stacked.unfold_from(linears[name])

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
                             self.gate_temperature, self.gate_top_k)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **unused) -> tuple[torch.Tensor, torch.Tensor]:
        # `unused`: MistralModel passes t_cond=None (its conditioned norm is refused: see architectures)
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


class FusionRouting:
    """What every LoRA-Flow causal LM adds to vLLM's: the adapters and gates its config.json names, loaded
    into its decoder layers, and the per-step routing that the hook (`loraflow.vllm.runner`) calls.

    A subclass names its vLLM decoder layer (`fused_layer`) and the base architecture it runs
    (`base_architecture`), builds vLLM's model with the layer type `fusion_parts` returns, then keeps the
    routing buffers and table with `attach_routing`.
    """

    fused_layer: type
    base_architecture: str

    def fusion_parts(self, vllm_config: VllmConfig) -> tuple[functools.partial, RoutingBuffers, FusionTable]:
        """The decoder-layer constructor to hand vLLM's model (`fused_layer` with this model's adapters,
        gates and routing buffers), the routing buffers and the fusion table. Refuses (one line) to be built
        by a model runner whose steps the routing hook does not route (Model Runner V2, any other)."""
        check_runner(loading_runner(), vllm_config)
        hf_config = vllm_config.model_config.hf_config
        check_settings(self.base_architecture, hf_config.to_dict(), f"{vllm_config.model_config.model}/config.json")
        settings = read_settings(hf_config)
        assets = load_assets(settings, hf_config.num_hidden_layers, hf_config.hidden_size)
        routing = RoutingBuffers(_max_step_tokens(vllm_config), len(assets.adapters), len(assets.gate_names))
        layer_type = functools.partial(self.fused_layer, assets=assets, routing=routing,
                                       dtype=vllm_config.model_config.dtype)
        return layer_type, routing, FusionTable(assets.adapter_names, assets.gate_names, assets.default_fusion)

    def attach_routing(self, routing: RoutingBuffers, table: FusionTable) -> None:
        """Keep the routing buffers (a submodule: they follow the model's device) and the fusion table."""
        self.loraflow_routing, self.loraflow_table = routing, table

    def load_weights(self, weights) -> set[str]:
        """vLLM's weight loading, then the adapters' A folded into the base linears (before vLLM's
        post-load processing packs those weights for its kernels). Every load derives the fold afresh
        from A: a second load (a reload, a weight sync) first gives the linears their own shapes back."""
        layers = [layer for layer in self.model.layers if isinstance(layer, FusedDecoderLayer)]  # not PPMissingLayer
        for layer in layers:
            layer.unfold_adapters()
        loaded = super().load_weights(weights)
        for layer in layers:
            layer.fold_adapters()
        return loaded

    def loraflow_route(self, fusions: list[str | None], tokens_per_request: list[int]) -> None:
        """Fill this step's routing buffers: request j (in batch order) has `tokens_per_request[j]` tokens."""
        self.loraflow_routing.fill(self.loraflow_table, fusions, tokens_per_request)


class LoraFlowLlamaDecoderLayer(FusedDecoderLayer, LlamaDecoderLayer):
    """vLLM's Llama decoder layer with LoRA-Flow."""


class LoraFlowMistralDecoderLayer(FusedDecoderLayer, MistralDecoderLayer):
    """vLLM's Mistral decoder layer (Llama's with Mistral's attention class) with LoRA-Flow."""


class LoraFlowQwen2DecoderLayer(FusedDecoderLayer, Qwen2DecoderLayer):
    """vLLM's Qwen2 decoder layer (q/k/v biases) with LoRA-Flow."""


class LoraFlowLlamaForCausalLM(FusionRouting, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with LoRA-Flow decoder layers; the adapters and gates are those the model
    directory's config.json `loraflow` block names (see `loraflow.vllm.prepare`)."""

    fused_layer = LoraFlowLlamaDecoderLayer
    base_architecture = "LlamaForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layer_type, routing, table = self.fusion_parts(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.attach_routing(routing, table)


class LoraFlowMistralForCausalLM(LoraFlowLlamaForCausalLM, MistralForCausalLM):
    """vLLM's MistralForCausalLM (a LlamaForCausalLM with Mistral's layers and model) with LoRA-Flow layers."""

    fused_layer = LoraFlowMistralDecoderLayer
    base_architecture = "MistralForCausalLM"


class LoraFlowQwen2ForCausalLM(FusionRouting, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM with LoRA-Flow decoder layers.

    Qwen2ForCausalLM builds its Qwen2Model with the default layer and takes no layer type, so this
    constructor wires the same parts itself (as vLLM's Qwen3ForCausalLM does), with
    `Qwen2Model(decoder_layer_type=...)`; forward, logits and weight loading are Qwen2ForCausalLM's.
    """

    fused_layer = LoraFlowQwen2DecoderLayer
    base_architecture = "Qwen2ForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layer_type, routing, table = self.fusion_parts(vllm_config)
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config, self.quant_config = config, vllm_config.quant_config
        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                decoder_layer_type=layer_type)
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self.attach_routing(routing, table)
