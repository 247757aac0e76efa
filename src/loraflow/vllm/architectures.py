"""The base architectures the vLLM plugin runs, and the settings of them its fused forward cannot: pure.

Each supported base architecture has one plugin architecture (a subclass of vLLM's own model for it, in
`loraflow.vllm.model`). The fused decoder-layer forward re-runs vLLM's attention as qkv -> rotary ->
attention -> o with the deltas added; a config whose vLLM layer does more than that in between (a norm
on q/k, a position-dependent q scale, a conditioned norm, dual-chunk attention) is refused, not run wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

from loraflow.common.errors import LoraFlowError

ARCHITECTURES = {  # base architecture (config.json) -> plugin architecture
    "LlamaForCausalLM": "LoraFlowLlamaForCausalLM",
    "MistralForCausalLM": "LoraFlowMistralForCausalLM",
    "Qwen2ForCausalLM": "LoraFlowQwen2ForCausalLM",
}
PLUGIN_CLASSES = {plugin: f"loraflow.vllm.model:{plugin}" for plugin in ARCHITECTURES.values()}

# config.json keys under which vLLM's layer of that architecture runs code the fused forward skips
_UNSUPPORTED_SETTINGS = {
    "MistralForCausalLM": ("llama_4_scaling", "ada_rms_norm_t_cond"),
    "Qwen2ForCausalLM": ("qk_norm", "dual_chunk_attention_config"),
}


def plugin_architecture(config: Mapping, where: str) -> str:
    """The plugin architecture that runs a base model's config.json (a dict), checked.

    Args:
        config: the base model's config.json.
        where: what to name in errors (the config file, or the model).

    Raises:
        LoraFlowError: (one line) no supported architecture, or one with a setting the plugin cannot run.
    """
    archs = [str(a) for a in config.get("architectures") or []]
    base = next((a for a in archs if a in ARCHITECTURES), None)
    if base is None:
        raise LoraFlowError(f"{where}: architecture {', '.join(archs) or '(none)'} is not supported by the vLLM "
                            f"engine (supported: {', '.join(ARCHITECTURES)})")
    check_settings(base, config, where)
    return ARCHITECTURES[base]


def check_settings(base: str, config: Mapping, where: str) -> None:
    """Refuse a config of base architecture `base` with a setting the fused forward does not run.

    Raises:
        LoraFlowError: (one line) naming the settings.
    """
    unsupported = [key for key in _UNSUPPORTED_SETTINGS.get(base, ()) if config.get(key)]
    if unsupported:
        raise LoraFlowError(f"{where}: {base} with {', '.join(unsupported)} set is not supported by the vLLM engine "
                            "(the plugin's fused layer does not run it)")
