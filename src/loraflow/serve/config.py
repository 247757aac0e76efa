"""What `loraflow serve` takes, declared once for the API and the CLI: what to load (`ServeOptions`)
and how to listen and batch (`ServeConfig`). Pure Python: the CLI checks these before loading a model."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.common.options import option
from loraflow.core.fusion_spec import FUSION_HELP

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_pairs(specs: list[str], option_name: str, what: str) -> list[tuple[str, str]]:
    """NAME=VALUE pairs of a repeated option, names unique; a ValueError names the option."""
    pairs = []
    for spec in specs or []:
        name, sep, value = str(spec).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{option_name}: {spec!r} is not NAME={what}")
        pairs.append((name.strip(), value.strip()))
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{option_name}: the name {', '.join(dup)} is given twice")
    return pairs


@dataclass
class ServeOptions:
    """The model a server loads: a base, k LoRA adapters, any number of named gates, fusion presets."""

    base: str = option(help="base causal LM: a transformers model directory with its tokenizer", metavar="BASE")
    adapter: list[str] = option(factory=list, repeat=True, metavar="NAME=PATH",
                                help="a PEFT LoRA adapter directory, served alone as NAME; repeat, in the "
                                     "gates' adapter order")
    gate: list[str] = option(factory=list, repeat=True, metavar="NAME=PATH",
                             help="a loraflow gate directory or official .pt gate: LoRA-Flow with it is served "
                                  "as NAME (repeatable)")
    fusion: list[str] = option(factory=list, repeat=True, metavar="NAME=SPEC",
                               help=f"a fixed fusion served as NAME; SPEC is {FUSION_HELP} (repeatable)")
    dtype: str | None = option(None, "dtype of base and adapters: auto (bf16 on GPUs that support it), float32, "
                                     "bfloat16, float16 (default: the checkpoint's)", choices=DTYPES)
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if not self.adapter:
            raise ValueError("adapter: give at least one --adapter NAME=PATH")
        self.adapters, self.gates, self.fusions  # check every pair now, before anything is loaded

    @property
    def adapters(self) -> dict[str, str]:
        return dict(parse_pairs(self.adapter, "adapter", "PATH"))

    @property
    def gates(self) -> dict[str, str]:
        return dict(parse_pairs(self.gate, "gate", "PATH"))

    @property
    def fusions(self) -> dict[str, str]:
        return dict(parse_pairs(self.fusion, "fusion", "SPEC"))


@dataclass
class ServeConfig:
    """How the server listens and batches."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port to listen on (0: any free port)")
    served_model_name: str | None = option(None, "the name requests use for the base model with adapters off "
                                                 "(default: the base model directory's name)")
    max_batch_size: int = option(16, "requests decoded together in one batch")
    max_queue: int = option(64, "requests that may wait for a batch row; beyond that the server answers 429")
    max_model_len: int | None = option(None, "prompt plus completion tokens per request (default: the model's "
                                             "max_position_embeddings, at most 32768)")
    prefill_chunk: int = option(256, "default engine: a longer prompt is prefilled this many tokens per step, the "
                                     "running requests decoding a token between its chunks (a long prompt does not "
                                     "stall them; vLLM chunks its own prefills)")
    seed: int = option(0, "seeds sampling for requests that bring no seed")
    compile: bool = option(False, "run prefill and decode under torch.compile (fullgraph, dynamic shapes: a few "
                                  "graphs for every batch size and fusion, compiled by the first requests)")

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a whole number >= 1, got {value}")
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 2:
            raise ValueError(f"prefill_chunk: must be a whole number >= 2, got {self.prefill_chunk}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len: must be a whole number >= 2, got {self.max_model_len}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: must be true or false, got {self.compile!r}")
        if not self.host:
            raise ValueError("host: must not be empty")
        if self.served_model_name is not None and (not self.served_model_name.strip()
                                                   or any(c.isspace() for c in self.served_model_name)):
            raise ValueError(f"served_model_name: must be a name without spaces, got {self.served_model_name!r}")
