"""`loraflow train-lora` and `loraflow train-gate`: flags from the training configs."""

from __future__ import annotations

import argparse

from loraflow.cli.args import add_options, build
from loraflow.core.config import ModelOptions
from loraflow.core.devices import RuntimeOptions
from loraflow.data.config import PromptOptions
from loraflow.train.config import GateTrainConfig, LoraTrainConfig, TrainRun


def add_train_gate(sub) -> None:
    p = sub.add_parser(
        "train-gate",
        help="train LoRA-Flow fusion gates on a few-shot set (base and LoRAs frozen)",
        description=(
            "Few-shot gate training with the official recipe: AdamW (wd 0.1, betas 0.9/0.95, eps 1e-5), "
            "cosine decay after 20% warm-up, clipping 1.0, 5 epochs, loss on response tokens only. Only the "
            "gates train (0.26M parameters for Llama-2-7B with k=2). Runs under Accelerate: `accelerate launch "
            "-m loraflow.cli train-gate ...` gives multi-GPU data parallelism with the same result. --gate "
            "starts from an existing gate."
        ),
        epilog=(
            "example (the paper's zh-math gate):\n"
            "  loraflow train-gate --base llama-2-7b --adapter zh=lora-zh --adapter math=lora-math \\\n"
            "      --train shared/loraflow-data/train/zh_math_train.jsonl --dev shared/loraflow-data/dev/zh_math_dev.jsonl \\\n"
            "      --template released --batch-size 4 --lr 1e-3 --out gates/zh_math"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, ModelOptions, skip=("temperature", "deprecated_temperature", "device", "compile"))
    add_options(p, TrainRun)
    add_options(p, PromptOptions)
    add_options(p, GateTrainConfig)
    add_options(p, RuntimeOptions)
    p.set_defaults(func=run_train_gate)


def run_train_gate(args: argparse.Namespace) -> int:
    from loraflow.common.errors import LoraFlowError
    from loraflow.train.training import train_gate

    build(RuntimeOptions, args).apply()
    model, run, prompts, cfg = (build(c, args) for c in (ModelOptions, TrainRun, PromptOptions, GateTrainConfig))
    if not model.adapters:
        raise LoraFlowError("no --adapter given: LoRA-Flow fuses k >= 1 LoRA adapters (--adapter NAME=PATH)")
    result = train_gate(
        model.base_path, model.adapters, run.train, run.out, dev_path=run.dev, config=cfg,
        template=prompts.to_template(), temperature=cfg.temperature, granularity=cfg.granularity, top_k=cfg.top_k,
        init_gate=model.gate, torch_dtype=_train_dtype(model), resume=run.resume, data_format=prompts.data_format,
        force=run.force,
    )
    print(f"trainable parameters: {result.trainable_parameters:,} (gates only)")
    print(f"best gate: {result.best_dir}  last: {result.last_dir}  log: {result.out_dir / 'train_log.json'}")
    return 0


def add_train_lora(sub) -> None:
    p = sub.add_parser(
        "train-lora",
        help="train one LoRA module with PEFT (standard PEFT output)",
        description=(
            "Train a LoRA adapter with PEFT on the same data formats. Defaults follow the released LoRAs: rank 64, "
            "alpha 16, dropout 0.1, all attention and MLP projections. OUT/best and OUT/last are standard PEFT "
            "adapter directories, loadable by PEFT and by loraflow."
        ),
        epilog=("example:\n  loraflow train-lora --base llama-2-7b --train zh_instructions.jsonl --out lora/zh \\\n"
                "      --template llama2 --rank 64 --alpha 16"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, ModelOptions, skip=("adapter", "gate", "temperature", "deprecated_temperature", "device",
                                        "compile"))
    add_options(p, TrainRun)
    add_options(p, PromptOptions)
    add_options(p, LoraTrainConfig)
    add_options(p, RuntimeOptions)
    p.set_defaults(func=run_train_lora)


def run_train_lora(args: argparse.Namespace) -> int:
    from loraflow.train.training import train_lora

    build(RuntimeOptions, args).apply()
    model, run, prompts, cfg = (build(c, args) for c in (ModelOptions, TrainRun, PromptOptions, LoraTrainConfig))
    result = train_lora(
        model.base_path, run.train, run.out, dev_path=run.dev, config=cfg, template=prompts.to_template(),
        r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.targets, torch_dtype=_train_dtype(model),
        resume=run.resume, data_format=prompts.data_format, force=run.force,
    )
    print(f"trainable parameters: {result.trainable_parameters:,} (LoRA)")
    print(f"best adapter: {result.best_dir}  last: {result.last_dir}  log: {result.out_dir / 'train_log.json'}")
    return 0


def _train_dtype(model: ModelOptions):
    """--dtype for training: auto keeps the checkpoint's dtype (Accelerate's --mixed-precision does
    the rest); an explicit dtype is used as given."""
    return None if model.dtype == "auto" else model.torch_dtype("cpu")
