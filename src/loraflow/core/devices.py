"""Where and in what precision a model runs: `auto` resolves to CUDA when present (else CPU) and
to bf16 on GPUs that support it (else fp32); `threads` pins torch's CPU thread count."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.common.errors import LoraFlowError
from loraflow.common.options import option

DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "auto (bf16 on GPUs that support it, else fp32), float32, bfloat16 or float16"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RuntimeOptions:
    """How a command runs: threads for CPU work and how much third-party output to show."""

    threads: int | None = option(None, "CPU threads for torch (default: torch's own choice)")
    verbose: bool = option(False, "show third-party progress bars, logs and warnings (hidden by default)")

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads: expected a whole number >= 1, got {self.threads!r}")

    def apply(self) -> None:
        """Set the thread count and the third-party verbosity for this process."""
        set_threads(self.threads)
        quiet_libraries(self.verbose)


def resolve_device(device: str | None = "auto") -> str:
    """A concrete torch device string for `device`; a device that is not there is a LoraFlowError."""
    import torch

    device = (device or "auto").strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise LoraFlowError(f"--device {device!r}: expected {DEVICE_HELP}") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise LoraFlowError(f"--device {device!r}: only CPU and CUDA devices are supported ({DEVICE_HELP})")
    if not torch.cuda.is_available():
        raise LoraFlowError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise LoraFlowError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(parsed)


def resolve_dtype(dtype: str | None, device: str):
    """The torch dtype for `dtype` on `device` (a resolved device string); None keeps the checkpoint's."""
    import torch

    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise LoraFlowError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op CPU threads (None leaves torch's default)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LoraFlowError(f"--threads {threads!r}: expected a whole number >= 1")
    import torch

    torch.set_num_threads(threads)


def quiet_libraries(verbose: bool = False) -> None:
    """Hide third-party progress bars, info logs and deprecation warnings the user did not ask for
    (transformers' "Loading weights" bar, PEFT/transformers FutureWarnings, the optimisers' notes under LoRAHub's
    search); `verbose` shows them.

    Process-wide switches of those libraries, meant for the command line's entry point.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for module in ("transformers", "peft", "accelerate", "torch", "huggingface_hub", "scipy", "nevergrad"):
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=module)
