"""Training: few-shot fusion gates (LoRA-Flow) and LoRA modules (PEFT), one shared loop.

The loop runs under Hugging Face Accelerate, so `accelerate launch` gives DDP (or FSDP) on many
GPUs, and `--mixed-precision bf16` autocast, with no code change. Each optimizer step sees exactly
`batch_size` examples in total, whatever the number of processes and accumulation steps: the
examples of a step are dealt round-robin to the processes, and the loss is the sum of the
response-token losses divided by the number of response tokens in the *global* batch, so one
process and two processes produce the same gradient.

Checkpoints are written at each epoch end, atomically: `OUT/last` (with optimizer and scheduler
state, for `--resume`) and `OUT/best` (by the chosen dev criterion). Ctrl-C leaves the last
complete checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraflow.data.formats import Example, PromptTemplate, collate, encode_examples, load_examples
from loraflow.common.checks import check_float, check_int, check_positive
from loraflow.common.errors import LoraFlowError
from loraflow.common.io import atomic_dir, check_output_dir, recover_dir, write_json_atomic
from loraflow.common.provenance import versions
from loraflow.train.config import GateTrainConfig, LoraTrainConfig, TrainConfig  # noqa: F401  (TrainConfig re-exported)
from loraflow.core.losses import response_token_count, summed_loss

logger = logging.getLogger(__name__)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainResult:
    out_dir: Path
    best_dir: Path
    last_dir: Path
    trainable_parameters: int
    log: dict = field(repr=False, default_factory=dict)


@torch.no_grad()
def mean_loss(model, dataset, batch_size: int, pad_id: int, accelerator) -> float:
    """Mean response-token loss over `dataset`, sharded over processes."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(dataset), world))
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        items = [dataset[i] for i in mine[start:start + batch_size]]
        batch = {k: v.to(accelerator.device) for k, v in collate(items, pad_id).items()}
        with accelerator.autocast():
            total[0] += summed_loss(model, batch).double()
        total[1] += sum(response_token_count(x) for x in items)
    total = accelerator.reduce(total, reduction="sum") if world > 1 else total
    return (total[0] / total[1].clamp(min=1)).item()


@dataclass
class Trainable:
    """What the loop needs to know about the thing being trained (gates or a LoRA)."""

    model: Any  # the module called in forward
    parameters: list[torch.nn.Parameter]
    save: Callable[[Path], None]  # write the weights into a directory
    load: Callable[[Path], None]  # read them back (for --resume)


LOG_NAME = "train_log.json"
STATE_NAME = "trainer_state.pt"


def check_run_dir(out_dir: str | os.PathLike, *, resume: bool, force: bool = False) -> Path:
    """Check the output directory before any expensive work.

    Without `resume` it must be new or empty: a finished or interrupted run there is refused (pass
    `resume` to continue it or `force` to start over), and so is a directory loraflow did not write.
    With `resume` it must hold `last/` with trainer state. A kill in the middle of a checkpoint
    swap is repaired first (`recover_dir`).
    """
    out_dir = check_output_dir(out_dir, force=True, what="training output directory")
    for sub in ("last", "best"):
        recover_dir(out_dir / sub)
    if resume:
        if not (out_dir / "last" / STATE_NAME).is_file():
            raise LoraFlowError(f"{out_dir / 'last' / STATE_NAME}: no checkpoint to resume from "
                                "(run without --resume to start training)")
        for log_path in (out_dir / "last" / LOG_NAME, out_dir / LOG_NAME):
            _read_log(log_path)  # a corrupt log is refused before any work, not silently replaced
        return out_dir
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        if (out_dir / LOG_NAME).is_file() or (out_dir / "last").is_dir():
            raise LoraFlowError(f"{out_dir}: holds a previous training run; pass --resume to continue it, "
                                "--force to start over, or choose another --out")
        raise LoraFlowError(f"{out_dir}: exists and was not written by loraflow; refusing to write into it "
                            "(choose another --out, or pass --force)")
    return out_dir


def make_accelerator(cfg: TrainConfig):
    """A fresh Accelerator for one run, created before the model so that it places the model on each rank's device.

    Accelerate keeps one process-wide state; the previous run's precision is forgotten (the process
    group, if any, is kept) so that several runs in one Python process may each choose their own.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def accelerated(cfg: TrainConfig) -> Iterator[Any]:
    """An Accelerator for one run; a process group it created is destroyed at the end, so processes exit cleanly."""
    from loraflow.core.distributed import owned_process_group

    with owned_process_group():
        yield make_accelerator(cfg)


def fit(
    trainable: Trainable,
    train: Sequence[dict],
    dev: Sequence[dict] | None,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    pad_id: int,
    resume: bool = False,
    dev_accuracy: Callable[[Any], float] | None = None,
    run_info: dict | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    accelerator=None,
    force: bool = False,
) -> dict:
    """The training loop shared by gates and LoRAs. Returns the JSON log (also written to OUT/train_log.json).

    Each epoch ends with `best/` (if it is the best so far), then `last/` (weights, optimizer and
    scheduler state and the log up to this epoch, in one atomic swap), then OUT/train_log.json; so
    the log inside `last/` never lags its checkpoint and a kill at any point resumes correctly.

    Raises:
        LoraFlowError: batch size not divisible by the processes, an empty training set, a
            non-finite loss or gradient (nothing of that step is saved), or a checkpoint that cannot
            be resumed. Under fp16 loss scaling a gradient overflow is not an error: the GradScaler
            skips that step (logged with "skipped") and training goes on.
    """
    if accelerator is None:
        with accelerated(cfg) as accelerator:
            return fit(trainable, train, dev, cfg, out_dir, pad_id=pad_id, resume=resume, dev_accuracy=dev_accuracy,
                       run_info=run_info, on_epoch_end=on_epoch_end, accelerator=accelerator, force=force)
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out_dir = Path(out_dir)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise LoraFlowError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    if not train:
        raise LoraFlowError("the training set is empty")
    optimizer = torch.optim.AdamW(trainable.parameters, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(trainable.model, optimizer)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    if cfg.max_steps is None:
        n_epochs, total_steps = cfg.epochs, steps_per_epoch * cfg.epochs
    else:  # as in transformers' Trainer: max_steps overrides epochs
        n_epochs, total_steps = math.ceil(cfg.max_steps / steps_per_epoch), cfg.max_steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)

    log = {"config": asdict(cfg), "run": run_info or {}, "versions": versions(), "world_size": world,
           "trainable_parameters": sum(p.numel() for p in trainable.parameters),
           "total_steps": total_steps, "steps": [], "epochs": [], "best": None}
    start_epoch, best_value = 0, None
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    if resume:
        start_epoch = _restore(trainable, optimizer, scheduler, out_dir, log)
        best_value = (log["best"] or {}).get("value")
        log["resumed_from_epoch"] = start_epoch

    def is_better(value: float) -> bool:
        if best_value is None:
            return True
        return value > best_value if cfg.select_by == "dev_accuracy" else value < best_value

    step_no = start_epoch * steps_per_epoch
    show = cfg.progress and accelerator.is_main_process
    bar = tqdm(total=total_steps, initial=min(step_no, total_steps), disable=not show, desc="train",
               dynamic_ncols=True)
    for epoch in range(start_epoch, n_epochs):
        if step_no >= total_steps:
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)  # data order and dropout masks, identical on resume
        order = torch.randperm(len(train)).tolist()
        model.train()
        skipped_in_epoch = 0
        for step in range(steps_per_epoch):
            if step_no >= total_steps:
                break
            global_ids = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            lr = optimizer.param_groups[0]["lr"]  # the rate this step really uses
            loss, grad_norm = _train_step(model, train, global_ids, cfg, pad_id, accelerator, trainable)
            step_no += 1
            if not math.isfinite(loss):
                raise LoraFlowError(
                    f"the training loss became {loss} at step {step_no} (epoch {epoch + 1}); stopped without saving "
                    "this epoch (lower --lr, or check the data and the adapters)"
                )
            if not math.isfinite(grad_norm) and getattr(accelerator, "scaler", None) is None:
                raise LoraFlowError(
                    f"the gradient norm became {grad_norm} at step {step_no} (epoch {epoch + 1}); stopped without "
                    "saving this epoch (lower --lr, or check the data and the adapters)"
                )
            # Under fp16 loss scaling an overflow is expected now and then: the GradScaler skips that
            # step and lowers its scale; the learning-rate schedule waits for the next real step.
            optimizer.step()
            skipped = accelerator.optimizer_step_was_skipped
            if not skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            entry = {"step": step_no, "epoch": epoch + 1, "loss": round(loss, 6), "lr": lr}
            if skipped:
                entry["skipped"] = "fp16 gradient overflow"
                logger.info("step %d skipped: fp16 gradient overflow (the loss scale is lowered)", step_no)
                skipped_in_epoch += 1
            log["steps"].append(entry)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")

        record = {"epoch": epoch + 1}
        if dev:
            record["dev_loss"] = mean_loss(model, dev, max(1, cfg.batch_size // world), pad_id, accelerator)
        if dev_accuracy is not None:
            record["dev_accuracy"] = dev_accuracy(accelerator.unwrap_model(model))
        log["epochs"].append(record)
        value = record.get(cfg.select_by)
        new_best = cfg.select_by == "last" or value is None or is_better(value)  # no dev set: keep the last
        if new_best:
            best_value = value
            log["best"] = {"epoch": epoch + 1, "criterion": cfg.select_by, "value": value}
        if accelerator.is_main_process:
            _save_epoch(trainable, optimizer, scheduler, epoch, step_no, log, last_dir, best_dir if new_best else None,
                        force)
            write_json_atomic(out_dir / LOG_NAME, log)
            summary = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch")
            bar.write(f"epoch {epoch + 1}/{n_epochs}" + (f": {summary}" if summary else "")
                      + (" (best)" if new_best else "")
                      + (f"; {skipped_in_epoch} step(s) skipped on fp16 overflow" if skipped_in_epoch else ""))
        accelerator.wait_for_everyone()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    bar.close()
    return log


def _train_step(model, train, global_ids: list[int], cfg: TrainConfig, pad_id: int, accelerator,
                trainable) -> tuple[float, float]:
    """Forward and backward of one optimizer step on this process's share.

    Returns the global mean token loss and the gradient norm after unscaling (inf or NaN when the
    gradients overflowed; 0.0 when --max-grad-norm is off and no norm is computed).

    A process with no example in the step (a last step smaller than the number of processes) still
    runs one forward and backward through the DDP model, with weight 0, so every process takes part
    in the gradient all-reduce and none waits forever.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    tokens = max(1, sum(response_token_count(train[i]) for i in global_ids))
    local = global_ids[rank::world]
    micro = [m for m in (local[j::cfg.grad_accum] for j in range(cfg.grad_accum)) if m]
    idle = not micro
    if idle:
        micro = [global_ids[:1]]
    step_loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for j, ids in enumerate(micro):
        batch = {k: v.to(accelerator.device) for k, v in collate([train[i] for i in ids], pad_id).items()}
        sync = accelerator.no_sync(model) if (j < len(micro) - 1 and world > 1) else contextlib.nullcontext()
        with sync, accelerator.autocast():
            loss_sum = summed_loss(model, batch)
            # DDP averages gradients over processes; scale so the result is sum / global tokens
            accelerator.backward(loss_sum * (0.0 if idle else world / tokens))
        if not idle:
            step_loss += loss_sum.detach().double()
    step_loss = accelerator.reduce(step_loss, reduction="sum") if world > 1 else step_loss
    norm = None
    if cfg.max_grad_norm:
        norm = accelerator.clip_grad_norm_(trainable.parameters, cfg.max_grad_norm)
    return (step_loss / tokens).item(), 0.0 if norm is None else float(norm)


def _save_epoch(trainable: Trainable, optimizer, scheduler, epoch: int, step: int, log: dict, last_dir: Path,
                best_dir: Path | None, force: bool) -> None:
    """best/ first, then last/ with trainer state and the log (one atomic swap each)."""
    if best_dir is not None:
        atomic_dir(best_dir, trainable.save, force=force)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step}
    text = json.dumps(log, indent=2, ensure_ascii=False) + "\n"

    def write_last(d: Path) -> None:
        trainable.save(d)
        torch.save(state, d / STATE_NAME)
        (d / LOG_NAME).write_text(text, encoding="utf-8")

    atomic_dir(last_dir, write_last, force=force)


def _restore(trainable: Trainable, optimizer, scheduler, out_dir: Path, log: dict) -> int:
    """Load OUT/last (weights, optimizer, scheduler, log) into this run; returns the epoch to start from."""
    from loraflow.core.checkpoints import load_torch_file

    last_dir = out_dir / "last"
    state_file = last_dir / STATE_NAME
    state = load_torch_file(state_file, what="trainer state")
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "epoch"} <= set(state):
        raise LoraFlowError(f"{state_file}: not a loraflow trainer state (missing optimizer, scheduler or epoch)")
    try:
        trainable.load(last_dir)
    except LoraFlowError:
        raise
    except Exception as e:  # the weights do not fit this model
        raise LoraFlowError(f"{last_dir}: cannot resume from this checkpoint ({_first_line(e)})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch = int(state["epoch"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise LoraFlowError(f"{state_file}: does not fit this run ({_first_line(e)})") from None
    old = _read_log(last_dir / LOG_NAME) or _read_log(out_dir / LOG_NAME) or {}
    log["steps"] = [s for s in old.get("steps", []) if s.get("epoch", 0) <= epoch + 1]
    log["epochs"] = [e for e in old.get("epochs", []) if e.get("epoch", 0) <= epoch + 1]
    log["best"] = old.get("best")
    return epoch + 1


def _read_log(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFlowError(f"{path}: corrupt training log ({e})") from None
    if not isinstance(log, dict):
        raise LoraFlowError(f"{path}: corrupt training log (not a JSON object)")
    for key in ("steps", "epochs"):
        if not isinstance(log.get(key, []), list) or not all(isinstance(x, dict) for x in log.get(key, [])):
            raise LoraFlowError(f"{path}: corrupt training log ('{key}' is not a list of objects)")
    if not isinstance(log.get("best"), (dict, type(None))):
        raise LoraFlowError(f"{path}: corrupt training log ('best' is not an object)")
    return log


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------- datasets
def _tokenized(path, tokenizer, template: PromptTemplate, max_length: int, fmt: str = "auto"):
    examples = load_examples(path, fmt=fmt)
    if not examples:
        raise LoraFlowError(f"{path}: no examples")
    data = encode_examples(examples, tokenizer, template, max_length)
    usable = [x for x in data if response_token_count(x) > 0]
    if len(usable) < len(data):
        logger.warning("%s: %d of %d examples have no response token within max_length=%d and are left out",
                       path, len(data) - len(usable), len(data), max_length)
    if not usable:
        raise LoraFlowError(f"{path}: no example has a response token within max_length={max_length}")
    return examples, usable


def _prepare_data(train_path, dev_path, tokenizer, template: PromptTemplate, cfg: TrainConfig, data_format: str):
    """Tokenized train and dev sets, and the dev-accuracy function when --select-by dev_accuracy."""
    _, train = _tokenized(train_path, tokenizer, template, cfg.max_length, data_format)
    dev_examples, dev = _tokenized(dev_path, tokenizer, template, cfg.max_length) if dev_path else ([], None)
    accuracy = None
    if cfg.select_by == "dev_accuracy":
        accuracy = _answer_accuracy(dev_examples, tokenizer, template, cfg.dev_max_new_tokens, cfg.batch_size)
        if accuracy is None:
            raise LoraFlowError(f"--select-by dev_accuracy needs a dev set with answers ({dev_path or 'no --dev'})")
    return train, dev, accuracy


def _answer_accuracy(examples: list[Example], tokenizer, template: PromptTemplate, max_new_tokens: int,
                     batch_size: int) -> Callable[[Any], float] | None:
    """Dev accuracy by greedy generation and the official math answer extraction, if the dev set has answers."""
    graded = [e for e in examples if e.answer]
    if not graded:
        return None
    from loraflow.data.formats import encode_prompt
    from loraflow.core.generation import generate_texts
    from loraflow.evaluation.scoring import score_math_example

    prompts = [tokenizer.decode(encode_prompt(e, tokenizer, template)) for e in graded]

    def accuracy(model) -> float:
        was_training = model.training
        model.eval()
        outs = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        model.train(was_training)
        return sum(score_math_example(o.text, e.answer)["correct"] for o, e in zip(outs, graded)) / len(graded)

    return accuracy


# ----------------------------------------------------------------------------- gates
def train_gate(
    base: str | os.PathLike | Any,
    adapters: Sequence[tuple[str, str]] | dict,
    train_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dev_path: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    template: PromptTemplate | None = None,
    tokenizer=None,
    temperature: float = GateTrainConfig.temperature,
    granularity: str = GateTrainConfig.granularity,
    top_k: int | None = GateTrainConfig.top_k,
    init_gate: str | os.PathLike | None = None,
    torch_dtype=None,
    resume: bool = False,
    data_format: str = "auto",
    on_epoch_end: Callable[[int], None] | None = None,
    force: bool = False,
) -> TrainResult:
    """Train LoRA-Flow fusion gates on a few-shot set; base and LoRAs stay frozen.

    Writes OUT/best and OUT/last (loraflow gate directories), OUT/train_log.json. OUT must be new or
    empty unless `resume` (continue from OUT/last) or `force` (start over / write into a foreign directory).
    """
    from loraflow.core.model import LoraFlowModel, check_torch_dtype, load_tokenizer

    cfg = config or GateTrainConfig()
    torch_dtype = check_torch_dtype(torch_dtype)
    out_dir = check_run_dir(out_dir, resume=resume, force=force)
    try:
        temperature = check_positive("temperature", temperature)
    except ValueError as e:
        raise LoraFlowError(f"--{e}") from None
    k = len(adapters)
    if top_k is not None and not 1 <= top_k <= k:
        raise LoraFlowError(f"--top-k {top_k}: must be from 1 to the number of adapters ({k})")
    template = template or PromptTemplate()
    tokenizer = tokenizer or load_tokenizer(base)
    train, dev, accuracy = _prepare_data(train_path, dev_path, tokenizer, template, cfg, data_format)
    with accelerated(cfg) as accelerator:
        torch.manual_seed(cfg.seed)
        # loaded on the CPU; accelerator.prepare puts it on this process's device
        model = LoraFlowModel.from_pretrained(base, adapters, gate=init_gate, temperature=temperature,
                                              granularity=granularity, torch_dtype=torch_dtype, seed=cfg.seed,
                                              gate_top_k=top_k)
        model.freeze_all_but_gates()
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model.model)
        meta = {"kind": "gate", "train": str(train_path), "dev": str(dev_path) if dev_path else None,
                "template": template.to_record(), "temperature": temperature, "granularity": granularity,
                "top_k": model.gates.config.top_k}
        trainable = Trainable(
            model=model, parameters=model.gate_parameters(),
            save=lambda d: _save_gate_into(model, d, meta, cfg),
            load=lambda d: model.load_gate(d),
        )
        n = model.num_gate_parameters()
        logger.info("trainable parameters: %d (gates only)", n)
        run_info = {**meta, "base": str(base) if not hasattr(base, "config") else None,
                    "adapters": [list(p) for p in _pairs(adapters)]}
        log = fit(trainable, train, dev, cfg, out_dir, pad_id=_pad_id(tokenizer), resume=resume,
                  dev_accuracy=accuracy, on_epoch_end=on_epoch_end, run_info=run_info, accelerator=accelerator,
                  force=force)
    return TrainResult(out_dir, out_dir / "best", out_dir / "last", n, log)


def _save_gate_into(model, directory: Path, meta: dict, cfg: TrainConfig) -> None:
    from loraflow.core.checkpoints import save_gate_checkpoint

    save_gate_checkpoint(directory, model.gate_config, model.gates.state_dict(),
                         extra={"training": meta, "seed": cfg.seed, "versions": versions()})


# ----------------------------------------------------------------------------- LoRA modules
def train_lora(
    base: str | os.PathLike | Any,
    train_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dev_path: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    template: PromptTemplate | None = None,
    tokenizer=None,
    r: int = LoraTrainConfig.rank,
    alpha: float = LoraTrainConfig.alpha,
    dropout: float = LoraTrainConfig.dropout,
    target_modules: Sequence[str] | str | None = None,
    torch_dtype=None,
    resume: bool = False,
    data_format: str = "auto",
    force: bool = False,
) -> TrainResult:
    """Train one LoRA module with PEFT (defaults as the released LoRAs: r 64, alpha 16, dropout 0.1,
    all attention and MLP projections). OUT/best and OUT/last are standard PEFT adapter directories.

    OUT must be new or empty unless `resume` or `force` (see `train_gate`).
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from loraflow.core.checkpoints import load_safetensors_file
    from loraflow.core.model import check_torch_dtype, load_base, load_tokenizer

    cfg = config or LoraTrainConfig()
    torch_dtype = check_torch_dtype(torch_dtype)
    try:
        r = check_int("rank", r, low=1)
        alpha = check_positive("alpha", alpha)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
    except ValueError as e:
        raise LoraFlowError(f"--{e}") from None
    out_dir = check_run_dir(out_dir, resume=resume, force=force)
    template = template or PromptTemplate()
    tokenizer = tokenizer or load_tokenizer(base)
    train, dev, accuracy = _prepare_data(train_path, dev_path, tokenizer, template, cfg, data_format)
    with accelerated(cfg) as accelerator:
        torch.manual_seed(cfg.seed)
        model = load_base(base, torch_dtype, {})  # on the CPU; accelerator.prepare places it
        targets = _lora_targets(model, target_modules)
        lora_cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                              task_type="CAUSAL_LM", bias="none")
        peft_model = get_peft_model(model, lora_cfg)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(peft_model.get_base_model())

        def save(d: Path) -> None:
            peft_model.save_pretrained(str(d))

        def load(d: Path) -> None:
            set_peft_model_state_dict(peft_model, load_safetensors_file(d / "adapter_model.safetensors",
                                                                        what="adapter weights file"))

        params = [p for p in peft_model.parameters() if p.requires_grad]
        meta = {"kind": "lora", "train": str(train_path), "r": r, "alpha": alpha, "dropout": dropout,
                "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
                "template": template.to_record()}
        log = fit(Trainable(peft_model, params, save, load), train, dev, cfg, out_dir, pad_id=_pad_id(tokenizer),
                  resume=resume, dev_accuracy=accuracy, run_info=meta, accelerator=accelerator, force=force)
    return TrainResult(out_dir, out_dir / "best", out_dir / "last", sum(p.numel() for p in params), log)


def _enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant), by the name this transformers has."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _lora_targets(model, requested: Sequence[str] | str | None) -> list[str] | str:
    """Requested targets, or the official seven projections where present, else every linear in the layers.

    Raises:
        LoraFlowError: a requested name that no linear layer of the model has (the message lists those it has).
    """
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if requested:
        wanted = [requested] if isinstance(requested, str) else [str(t) for t in requested]
        if wanted == ["all-linear"]:
            return "all-linear"
        unknown = [t for t in wanted if t not in names]
        if unknown or not wanted:
            raise LoraFlowError(f"--target-modules: {', '.join(unknown) or '(none)'} not found among this model's "
                                f"linear layers ({', '.join(sorted(names))})")
        return wanted
    official = [t for t in LLAMA_TARGETS if t in names]
    return official if official else "all-linear"


def _pairs(adapters) -> list[tuple[str, str]]:
    items = adapters.items() if isinstance(adapters, dict) else adapters
    return [(str(n), str(p)) for n, p in items]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id
