"""What the model commands take, declared once for the API and the CLI: which base, adapters and
gate to load (`ModelOptions`), and how to generate (`GenerateOptions`, `InspectOptions`)."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.common.checks import check_int, check_positive
from loraflow.common.errors import LoraFlowError
from loraflow.common.options import option
from loraflow.core.fusion_spec import FUSION_HELP

DTYPES = ("float32", "bfloat16", "float16")


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

    base: str = option(help="base causal LM: a transformers model directory (or hub name)", metavar="BASE")
    adapter: list[str] = option(factory=list, repeat=True, metavar="NAME=PATH",
                                help="a PEFT LoRA adapter directory; repeat, in gate order (official gates: "
                                     "language first)")
    gate: str | None = option(None, "gate: a loraflow gate directory or an official LoRA-Flow .pt file")
    temperature: float | None = option(None, "gate softmax temperature (default: the gate's own)")
    dtype: str | None = option(None, "dtype of base and adapters (default: the checkpoint's, float32 on CPU)",
                               choices=DTYPES)
    device: str | None = option(None, "torch device, e.g. cuda:0 (default: cpu)")

    def __post_init__(self) -> None:
        if self.temperature is not None:
            self.temperature = check_positive("temperature", self.temperature)

    @property
    def adapters(self) -> list[tuple[str, str]]:
        return parse_adapters(self.adapter)

    def load(self, *, seed: int | None = None):
        """(LoraFlowModel, tokenizer) as these options describe."""
        from loraflow.core.model import LoraFlowModel, load_tokenizer

        adapters = self.adapters
        if not adapters:
            raise LoraFlowError("no --adapter given: LoRA-Flow fuses k >= 1 LoRA adapters (--adapter NAME=PATH)")
        model = LoraFlowModel.from_pretrained(self.base, adapters, gate=self.gate, temperature=self.temperature,
                                              torch_dtype=self.dtype, device=self.device, seed=seed)
        return model, load_tokenizer(self.base)


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
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.prompts_file):
            raise ValueError("prompt: give --prompt (repeatable) or --prompts-file, not both or neither")
        _check_positive(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


@dataclass
class InspectOptions:
    """A generation traced for its fusion weights, drawn as a heatmap."""

    prompt: str = option(help="the prompt, used as given")
    out: str = option(help="heatmap PNG path")
    csv: str | None = option(None, "also write the weights as CSV (layer, token_index, token, w_<adapter>...)")
    max_new_tokens: int = option(64, "new tokens at most")
    title: str | None = option(None, "figure title")
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        _check_positive(max_new_tokens=self.max_new_tokens)
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_int(name, value, low=1)
