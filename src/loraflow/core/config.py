"""What the model commands take, declared once for the API and the CLI: which base, adapters and
gate to load (`ModelOptions`), and how to generate (`GenerateOptions`, `InspectOptions`)."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.common.checks import check_int, check_positive
from loraflow.common.errors import LoraFlowError
from loraflow.common.options import option
from loraflow.core.devices import DEVICE_HELP, DTYPE_HELP, DTYPES
from loraflow.core.fusion_spec import FUSION_HELP


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` pairs from repeated --adapter options, in the order given."""
    pairs = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LoraFlowError(f"--adapter {spec!r}: expected NAME=PATH")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise LoraFlowError(f"--adapter: each adapter needs its own name (got {', '.join(names)})")
    return pairs


@dataclass
class ModelOptions:
    """A base model, k LoRA adapters and (optionally) a gate: what `LoraFlowModel.from_pretrained` loads."""

    base: str = option(help="base causal LM: a transformers model directory, hub name or .gguf file "
                            "(dequantised; needs the gguf package)", metavar="BASE")
    gguf_file: str | None = option(None, "a .gguf file inside the --base directory (same as --base DIR/FILE)",
                                   metavar="FILE")
    adapter: list[str] = option(factory=list, repeat=True, metavar="NAME=PATH",
                                help="a PEFT LoRA adapter directory; repeat, in gate order (official gates: "
                                     "language first)")
    gate: str | None = option(None, "gate: a loraflow gate directory or an official LoRA-Flow .pt file")
    temperature: float | None = option(None, "gate softmax temperature (default: the gate's own; not sampling, "
                                             "see --sampling-temperature)", flag="--gate-temperature")
    deprecated_temperature: float | None = option(None, "deprecated alias of --gate-temperature",
                                                  flag="--temperature")
    dtype: str = option("auto", "dtype of base and adapters: " + DTYPE_HELP, choices=DTYPES)
    device: str = option("auto", "where the model runs: " + DEVICE_HELP)
    compile: bool = option(False, "compile the model's forward with torch.compile (one graph for every fusion; "
                                  "a static KV cache while generating): faster steps after a one-off compile")

    def __post_init__(self) -> None:
        if self.deprecated_temperature is not None:
            import warnings

            self.deprecated_temperature = check_positive("deprecated_temperature", self.deprecated_temperature)

            warnings.warn("--temperature is deprecated: it sets the gate's softmax temperature; use "
                          "--gate-temperature (or --sampling-temperature for sampling)", FutureWarning, stacklevel=2)
            if self.temperature is None:
                self.temperature = self.deprecated_temperature
            self.deprecated_temperature = None
        if self.temperature is not None:
            self.temperature = check_positive("temperature", self.temperature)

    @property
    def base_path(self) -> str:
        """--base, or --base DIR joined with --gguf-file: what every loader accepts."""
        import os

        return os.path.join(self.base, self.gguf_file) if self.gguf_file else self.base

    def torch_device(self) -> str:
        """The concrete device (auto: CUDA when present, else CPU)."""
        from loraflow.core.devices import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self, device: str | None = None):
        """The torch dtype on `device` (auto: bf16 on GPUs that support it, else fp32)."""
        from loraflow.core.devices import resolve_dtype

        return resolve_dtype(self.dtype, device or self.torch_device())

    @property
    def adapters(self) -> list[tuple[str, str]]:
        return parse_adapters(self.adapter)

    def load(self, *, seed: int | None = None):
        """(LoraFlowModel, tokenizer) as these options describe."""
        from loraflow.core.model import LoraFlowModel, load_tokenizer

        adapters = self.adapters
        if not adapters:
            raise LoraFlowError("no --adapter given: LoRA-Flow fuses k >= 1 LoRA adapters (--adapter NAME=PATH)")
        device = self.torch_device()
        model = LoraFlowModel.from_pretrained(self.base_path, adapters, gate=self.gate, temperature=self.temperature,
                                              torch_dtype=self.torch_dtype(device), device=device, seed=seed)
        if self.compile:
            model.compile(dynamic=True)  # prompts of many lengths: one graph for prefill, one for decode
        return model, load_tokenizer(self.base_path)


@dataclass
class GenerateOptions:
    """Generation from prompts with a fusion mode."""

    prompt: list[str] = option(factory=list, repeat=True, help="a prompt (repeatable)")
    prompts_file: str | None = option(None, "a text file with one prompt per line, or a .jsonl file with a "
                                            "'prompt' field per line")
    max_new_tokens: int = option(128, "new tokens per prompt at most")
    batch_size: int = option(8, "prompts per generation batch")
    mode: str = option("gate", FUSION_HELP)
    stop: list[str] = option(factory=list, repeat=True, help="stop string (repeatable)")
    show_weights: bool = option(False, "print each generated token with its fusion weights (mean over layers)")
    do_sample: bool = option(False, "sample instead of greedy decoding (reproducible with --seed)")
    sampling_temperature: float = option(1.0, "sampling temperature with --do-sample (not the gate's: "
                                              "--gate-temperature)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this probability mass")
    top_k: int = option(0, "keep the k most likely tokens when sampling (0: no limit)")
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.prompts_file):
            raise ValueError("prompt: give --prompt (repeatable) or --prompts-file, not both or neither")
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        check_int("batch_size", self.batch_size, low=1)
        if any(s == "" for s in self.stop):
            raise ValueError("stop: an empty stop string would end every output before its first token")
        self.sampling()  # validates the sampling settings

    def sampling(self):
        """The decoding settings (greedy unless --do-sample)."""
        from loraflow.core.generation import Sampling

        return Sampling(self.do_sample, self.sampling_temperature, self.top_p, self.top_k)


@dataclass
class InspectOptions:
    """A generation traced for its fusion weights, drawn as a heatmap."""

    prompt: str = option(help="the question; the prompt template (--template) turns it into the model's prompt")
    out: str = option(help="heatmap PNG path")
    csv: str | None = option(None, "also write the weights as CSV (layer, token_index, token, w_<adapter>...)")
    max_new_tokens: int = option(64, "new tokens at most")
    title: str | None = option(None, "figure title")
    seed: int = option(0, "random seed")
    force: bool = option(False, "replace output files that loraflow did not write (or that were changed since)")

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        if not self.prompt.strip():
            raise ValueError("prompt: the prompt is empty")


@dataclass
class ConvertGateOptions:
    """An official `.pt` gate converted into a loraflow gate directory."""

    official: str = option(help="the official .pt gate file")
    adapters: str = option(help="comma-separated adapter names in gate-output order (official: language,task)")
    out: str = option(help="output gate directory")
    temperature: float = option(1.0, "temperature to record (the authors used 1.1 for zh/ru math)")
    base_model: str | None = option(None, "base model name to record (informational)")
    force: bool = option(False, "replace an --out directory that loraflow did not write")
    seed: int = option(0, "random seed (nothing here is random; accepted for uniformity)")

    def __post_init__(self) -> None:
        self.temperature = check_positive("temperature", self.temperature)

    @property
    def adapter_names(self) -> list[str]:
        return [n.strip() for n in self.adapters.split(",") if n.strip()]

