"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts."""

from __future__ import annotations

from loraflow.vllm.architectures import PLUGIN_CLASSES


def register() -> None:
    """Check vLLM's install and version, register the LoRA-Flow architectures, install the routing hook.

    Safe to call more than once. Raises LoraFlowError (one line) on an unsupported vLLM.
    """
    import vllm
    from vllm import ModelRegistry

    from loraflow.vllm.runner import install_routing_hook
    from loraflow.vllm.versions import check_vllm_install, check_vllm_version

    check_vllm_install()
    check_vllm_version(vllm.__version__)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in PLUGIN_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    install_routing_hook()
