"""Training settings, each declared once: the library's defaults are the CLI's defaults.

`TrainConfig` holds the optimisation recipe shared by gates and LoRAs (defaults: the official
gate recipe); `GateTrainConfig` and `LoraTrainConfig` add what only one of them has and the
LoRA recipe's own defaults. Pure Python (no torch), so `loraflow --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.common.checks import check_float, check_int, check_positive
from loraflow.common.options import option, override

SELECT_BY = ("dev_loss", "dev_accuracy", "last")
MIXED_PRECISION = ("no", "bf16", "fp16")
GRANULARITIES = ("layer", "model", "module")


@dataclass
class TrainConfig:
    """Optimisation settings shared by gate and LoRA training (defaults: the official gate recipe)."""

    epochs: int = option(5, "passes over the training set (official: 5)")
    lr: float = option(1e-3, "peak learning rate (official best: 1e-3 or 1e-4 depending on the pair)")
    batch_size: int = option(4, "examples per optimizer step, summed over processes and accumulation")
    grad_accum: int = option(1, "micro-batches per step on each process (a memory knob; the result is the same)")
    warmup_ratio: float = option(0.2, "share of steps with linear warm-up before the cosine decay")
    weight_decay: float = option(0.1, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas", cli=False)
    eps: float = option(1e-5, "AdamW epsilon", cli=False)
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    max_length: int = option(4096, "token limit per example")
    seed: int = option(0, "seeds initialisation, data order and dropout")
    mixed_precision: str = option("no", "autocast precision (GPU)", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    select_by: str = option("dev_loss", "how best/ is chosen (last when there is no --dev; dev_accuracy needs "
                                        "answers in the dev set)", choices=SELECT_BY)
    dev_max_new_tokens: int = option(512, "generation budget for dev accuracy")
    progress: bool = option(True, "progress bars", flag="--no-progress")
    max_steps: int | None = option(None, "stop after this many optimizer steps, the schedule sized to them "
                                         "(overrides --epochs)")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "dev_max_new_tokens"):
            check_int(name, getattr(self, name), low=1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, low=1)
        check_int("seed", self.seed)
        self.lr = check_positive("lr", self.lr)
        self.eps = check_positive("eps", self.eps)
        self.warmup_ratio = check_float("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, low=0.0)
        self.max_grad_norm = check_float("max_grad_norm", self.max_grad_norm, low=0.0)
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"betas: expected two numbers, got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_float(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by: {self.select_by!r} is not one of {', '.join(SELECT_BY)}")
        self.betas = tuple(self.betas)


@dataclass
class GateTrainConfig(TrainConfig):
    """Gate training: the official recipe plus the gate's own settings."""

    temperature: float = option(1.0, "gate softmax temperature (the authors used 1.1 for zh/ru math)",
                                flag="--gate-temperature")
    deprecated_temperature: float | None = option(None, "deprecated alias of --gate-temperature", flag="--temperature")
    granularity: str = option("layer", "one gate per layer (the paper's best), one for the model, or one per "
                                       "module", choices=GRANULARITIES)
    top_k: int | None = option(None, "keep each token's K largest gate logits: softmax over them, their biases "
                                     "added, the other adapters weighing 0 (default: all k, the paper's gate)",
                               metavar="K")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.deprecated_temperature is not None:
            import warnings

            self.deprecated_temperature = check_positive("deprecated_temperature", self.deprecated_temperature)

            warnings.warn("--temperature is deprecated: use --gate-temperature", FutureWarning, stacklevel=2)
            self.temperature, self.deprecated_temperature = self.deprecated_temperature, None
        self.temperature = check_positive("temperature", self.temperature)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k: must be a whole number >= 1, got {self.top_k!r}")


@dataclass
class LoraTrainConfig(TrainConfig):
    """LoRA training: the released LoRAs' shape (r 64, alpha 16, dropout 0.1) and recipe."""

    epochs: int = override(TrainConfig, "epochs", 3)
    lr: float = override(TrainConfig, "lr", 2e-4)
    batch_size: int = override(TrainConfig, "batch_size", 16)
    rank: int = option(64, "LoRA rank r")
    alpha: float = option(16.0, "lora_alpha (the adapter's scale is alpha / r)")
    dropout: float = option(0.1, "lora_dropout, in [0, 1)")
    target_modules: str | None = option(None, "comma-separated module names (default: the q, k, v, o, gate, up "
                                              "and down projections where present, else all linear layers)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank, low=1)
        self.alpha = check_positive("alpha", self.alpha)
        self.dropout = check_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)

    @property
    def targets(self) -> list[str] | None:
        """`target_modules` as a list (None: the default set)."""
        if not self.target_modules:
            return None
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


@dataclass
class TrainRun:
    """Where a training run reads its data and writes its checkpoints."""

    train: str = option(help="training JSONL (official math/code files, prompt/completion, or chat messages)")
    out: str = option(help="output directory: best/, last/, train_log.json")
    dev: str | None = option(None, "dev JSONL: dev loss each epoch (and accuracy for math-style answers)")
    resume: bool = option(False, "continue from OUT/last (after Ctrl-C or a crash)")
    force: bool = option(False, "start over in an OUT that holds a previous run, or write into a directory "
                                "loraflow did not create (its other files stay)")
