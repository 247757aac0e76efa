"""Settings of `loraflow serve` (one source of truth for the CLI's flags, defaults and help)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    """How the server listens and batches. Model loading (base, adapters, gates) is separate."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on (0: any free port)"})
    served_model_name: str | None = field(
        default=None, metadata={"help": "the name requests use for the base model, adapters off "
                                        "(default: the base model directory's name)"})
    max_batch_size: int = field(default=16, metadata={"help": "requests decoded together in one batch"})
    max_queue: int = field(default=64, metadata={"help": "requests that may wait for a batch row; "
                                                          "beyond that the server answers 429"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "prompt plus completion tokens per request (default: the model's "
                                        "max_position_embeddings, at most 32768)"})
    seed: int = field(default=0, metadata={"help": "seeds sampling for requests that bring no seed"})

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a whole number >= 1, got {value}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len: must be a whole number >= 2, got {self.max_model_len}")
        if not self.host:
            raise ValueError("host: must not be empty")
        if self.served_model_name is not None and (not self.served_model_name.strip()
                                                   or any(c.isspace() for c in self.served_model_name)):
            raise ValueError(f"served_model_name: must be a name without spaces, got {self.served_model_name!r}")
