"""Subcommand definitions for the `loraflow` CLI: arguments here, the work in the library.

Each subcommand is one `@command` function that adds its parser and sets `func` to a runner.
Runners import torch/transformers inside their bodies only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Registrar = Callable[["argparse._SubParsersAction"], None]
REGISTRARS: list[Registrar] = []


def command(fn: Registrar) -> Registrar:
    """Register a function that adds one subcommand to the parser."""
    REGISTRARS.append(fn)
    return fn


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


@command
def _report(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "report",
        help="tabulate RESULT.json files in the paper's layout (Markdown, CSV, bar chart)",
        description=(
            "Collect RESULT.json files written by `loraflow eval` / `loraflow score` and print a\n"
            "Markdown table in the paper's layout: one row per method (Base, Single LoRA (language),\n"
            "Single LoRA (task), Avg fusion, LoRAHub, LoRA-Flow, then others); per task, the languages\n"
            "and their average. Scores are percentages; several runs of one cell (e.g. seeds) show as\n"
            "mean ± sample std. Missing cells show as '–'."
        ),
        epilog=(
            "examples:\n"
            "  loraflow report runs/*/RESULT.json\n"
            "  loraflow report runs/ --out-dir report/        # also writes table.md, table.csv, table.png\n"
            "  loraflow report 'runs/**/RESULT.json' --csv t.csv --png t.png --title 'Llama-2-7B'\n"
            "\nA directory contributes its *.json files that look like results (have 'method' and "
            "'score');\nother JSON there is skipped with a count on stderr. Files named explicitly "
            "must be valid results."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="RESULT",
                   help="RESULT.json files, directories containing them, or glob patterns ('**' recurses)")
    p.add_argument("--out-dir", metavar="DIR", help="write table.md, table.csv and table.png into DIR")
    p.add_argument("--md", metavar="FILE", help="write the Markdown table to FILE")
    p.add_argument("--csv", metavar="FILE", help="write the machine-readable CSV (mean, std, n per cell) to FILE")
    p.add_argument("--png", metavar="FILE", help="write a grouped bar chart to FILE")
    p.add_argument("--title", help="heading of the Markdown file and title of the chart")
    p.add_argument("--task-name", action="append", metavar="TASK=NAME", default=[],
                   help="display name of a task's column group (default: math=MGSM, code=HumanEval); repeatable")
    add_seed(p)  # accepted for uniformity with the other commands; unused
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    import sys

    from loraflow.evaluation.report import parse_task_names, write_report

    rep = write_report(
        args.inputs, out_dir=args.out_dir, md=args.md, csv_path=args.csv, png=args.png,
        title=args.title, task_names=parse_task_names(args.task_name),
    )
    sys.stdout.write(rep.markdown)
    if rep.skipped:
        print(f"loraflow report: skipped {rep.skipped} non-result JSON file(s)", file=sys.stderr)
    for note in rep.table.notes:
        print(f"loraflow report: warning: {note}", file=sys.stderr)
    for path in rep.written:
        print(f"loraflow report: wrote {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- model commands
def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` pairs from repeated --adapter options, in the order given."""
    from loraflow.common.errors import LoraFlowError

    pairs = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LoraFlowError(f"--adapter {spec!r}: expected NAME=PATH")
        pairs.append((name, path))
    if not pairs:
        raise LoraFlowError("no --adapter given: LoRA-Flow fuses k >= 1 LoRA adapters (--adapter NAME=PATH)")
    return pairs


def add_model_args(p: argparse.ArgumentParser, *, gate: bool = True) -> None:
    """--base, --adapter, --gate, --temperature, --dtype, --device: how to build a LoraFlowModel."""
    p.add_argument("--base", required=True, help="base causal LM: a transformers model directory (or hub name)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", default=[],
                   help="a PEFT LoRA adapter directory; repeat, in gate order (official gates: language first)")
    if gate:
        p.add_argument("--gate", help="gate: a loraflow gate directory or an official LoRA-Flow .pt file")
        p.add_argument("--temperature", type=float, help="gate softmax temperature (default: the gate's own, 1.0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of base and adapters (default: float32 on CPU)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")


def build_model_from_args(args: argparse.Namespace, *, gate_required: bool = False):
    """A LoraFlowModel and its tokenizer from the options of add_model_args."""
    from loraflow.common.errors import LoraFlowError
    from loraflow.core.model import LoraFlowModel, load_tokenizer

    adapters = parse_adapters(args.adapter)
    gate = getattr(args, "gate", None)
    if gate_required and not gate:
        raise LoraFlowError("--gate is required")
    model = LoraFlowModel.from_pretrained(
        args.base, adapters, gate=gate, temperature=getattr(args, "temperature", None),
        torch_dtype=args.dtype, device=args.device, seed=getattr(args, "seed", None),
    )
    return model, load_tokenizer(args.base)


@command
def _generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with k LoRAs fused by a gate",
        description=(
            "Greedy generation with LoRA-Flow: the base model plus k LoRA adapters mixed per token by the "
            "gate. Prompts are used as given (apply your chat template yourself)."
        ),
        epilog=(
            "example:\n  loraflow generate --base llama-2-7b --adapter zh=lora-zh --adapter math=lora-math \\\n"
            "      --gate zh_math.pt --temperature 1.1 --prompt '[INST] ... [/INST]' --show-weights"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts-file",
                     help="a text file with one prompt per line, or a .jsonl file with a 'prompt' field per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", default="gate", help="gate (default), off, single:NAME or static:w1,w2,...")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--show-weights", action="store_true",
                   help="print each generated token with its fusion weights (mean over layers)")
    add_seed(p)
    p.set_defaults(func=_run_generate)


def _read_prompts(args) -> list[str]:
    from pathlib import Path

    from loraflow.common.errors import LoraFlowError

    if args.prompt:
        return args.prompt
    path = Path(args.prompts_file)
    if not path.is_file():
        raise LoraFlowError(f"{path}: prompts file not found")
    if path.suffix == ".jsonl":
        from loraflow.common.io import read_jsonl

        rows = read_jsonl(path)
        missing = [i for i, r in enumerate(rows, 1) if not isinstance(r.get("prompt"), str)]
        if missing:
            raise LoraFlowError(f"{path}: line {missing[0]} has no string 'prompt'")
        return [r["prompt"] for r in rows]
    return [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from loraflow.core.generation import generate_texts

    torch.manual_seed(args.seed)
    prompts = _read_prompts(args)
    model, tokenizer = build_model_from_args(args)
    from loraflow.core.fusion_spec import parse_fusion

    model.set_fusion(parse_fusion(args.mode, model.adapter_names, option="--mode"))
    capture = args.show_weights and model.fusion_mode == "gate"
    outs = generate_texts(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, stop_strings=args.stop, capture_weights=capture)
    names = model.adapter_names
    for i, g in enumerate(outs):
        if len(outs) > 1:
            print(f"=== prompt {i + 1}")
        print(g.text)
        if capture and g.weights is not None:
            print("\n" + "token".ljust(16) + "".join(n[:10].rjust(11) for n in names))
            mean = g.weights.mean(0)  # (tokens, k)
            for tid, w in zip(g.token_ids, mean.tolist()):
                piece = repr(tokenizer.decode([tid]))[:15]
                print(piece.ljust(16) + "".join(f"{x:11.3f}" for x in w))
    return 0


@command
def _convert_gate(sub) -> None:
    p = sub.add_parser(
        "convert-gate",
        help="convert an official LoRA-Flow .pt gate into a loraflow gate directory",
        description=(
            "Read an official gate file (torch.save'd dict of 'encoder.layers.N.lora_fusion_gate.weight' and "
            "optional 'weight_bias'; loaded with weights_only=True, so pickles that run code are refused) and "
            "write a loraflow gate directory recording adapter names, layer count and hidden size."
        ),
        epilog="example:\n  loraflow convert-gate --official zh_math.pt --adapters zh,math --out gates/zh_math",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--official", required=True, help="the official .pt gate file")
    p.add_argument("--adapters", required=True,
                   help="comma-separated adapter names in gate-output order (official: language,task)")
    p.add_argument("--out", required=True, help="output gate directory")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="temperature to record (the authors used 1.1 for zh/ru math)")
    p.add_argument("--base-model", default=None, help="base model name to record (informational)")
    add_seed(p)
    p.set_defaults(func=_run_convert_gate)


def _run_convert_gate(args: argparse.Namespace) -> int:
    from loraflow.core.checkpoints import convert_official_gate, load_gate_checkpoint

    names = [n.strip() for n in args.adapters.split(",") if n.strip()]
    out = convert_official_gate(args.official, names, args.out, temperature=args.temperature,
                                base_model=args.base_model)
    config, _ = load_gate_checkpoint(out)
    print(f"wrote {out}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"adapters {','.join(config.adapter_names)}, temperature {config.temperature}")
    return 0


# ---------------------------------------------------------------------------- training commands
def add_train_args(p: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int) -> None:
    """Data, prompt and optimisation options shared by train-gate and train-lora."""
    p.add_argument("--train", required=True, help="training JSONL (official math/code files, prompt/completion, "
                                                 "or chat messages)")
    p.add_argument("--dev", help="dev JSONL: dev loss each epoch (and accuracy for math-style answers)")
    p.add_argument("--out", required=True, help="output directory: best/, last/, train_log.json")
    p.add_argument("--data-format", default="auto",
                   choices=["auto", "math_train", "code_train", "math_dev", "mbpp", "prompt_completion", "messages"],
                   help="format of --train (default: detected from the first line)")
    p.add_argument("--template", default="llama2", choices=["llama2", "released", "paper", "chat", "plain"],
                   help="prompt format: llama2 (official template; no system prompt unless --system), released "
                        "(reproduces the authors' released script: no system prompt, Chinese step-by-step cue "
                        "after [/INST]), paper (official system prompt of --lang/--task), chat (the tokenizer's "
                        "chat template) or plain")
    p.add_argument("--system", help="system prompt text (llama2/chat templates)")
    p.add_argument("--cue", default=None, help="text placed right after the prompt, e.g. '让我们一步一步地思考。'")
    p.add_argument("--lang", help="language code for --template paper (zh, ru, es)")
    p.add_argument("--task", help="task for --template paper (math, code)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default: {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g})")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"examples per optimizer step over all processes (default: {batch_size})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step per process (memory only)")
    p.add_argument("--warmup-ratio", type=float, default=0.2, help="share of warm-up steps (default: 0.2)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=4096, help="token limit per example (default: 4096)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="autocast (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--select-by", choices=["dev_loss", "dev_accuracy", "last"], default="dev_loss",
                   help="how best/ is chosen (default: dev_loss; last when there is no --dev)")
    p.add_argument("--dev-max-new-tokens", type=int, default=512, help="generation budget for dev accuracy")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last (after Ctrl-C or a crash)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_seed(p)


def template_from_args(args: argparse.Namespace):
    from dataclasses import replace

    from loraflow.data.formats import PromptTemplate

    template = PromptTemplate.from_preset(args.template, lang=args.lang, task=args.task)
    if args.system is not None:
        template = replace(template, system=args.system or None)
    if args.cue is not None:
        template = replace(template, cue=args.cue)
    return template


def train_config_from_args(args: argparse.Namespace):
    from loraflow.common.errors import LoraFlowError
    from loraflow.train.training import TrainConfig

    try:
        return TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
            warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
            max_length=args.max_length, seed=args.seed, mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing, select_by=args.select_by,
            dev_max_new_tokens=args.dev_max_new_tokens, progress=not args.no_progress,
        )
    except ValueError as e:
        raise LoraFlowError(f"--{str(e).split(':')[0].replace('_', '-')}: {str(e).split(':', 1)[-1].strip()}") from None


@command
def _train_gate(sub) -> None:
    p = sub.add_parser(
        "train-gate",
        help="train LoRA-Flow fusion gates on a few-shot set (base and LoRAs frozen)",
        description=(
            "Few-shot gate training with the official recipe: AdamW (wd 0.1, betas 0.9/0.95, eps 1e-5), "
            "cosine decay after 20%% warm-up, clipping 1.0, 5 epochs, loss on response tokens only. Only the "
            "gates train (0.26M parameters for Llama-2-7B with k=2). Runs under Accelerate: `accelerate launch "
            "-m loraflow.cli train-gate ...` gives multi-GPU data parallelism with the same result."
        ),
        epilog=(
            "example (the paper's zh-math gate):\n"
            "  loraflow train-gate --base llama-2-7b --adapter zh=lora-zh --adapter math=lora-math \\\n"
            "      --train shared/loraflow-data/train/zh_math_train.jsonl --dev shared/loraflow-data/dev/zh_math_dev.jsonl \\\n"
            "      --template released --batch-size 4 --lr 1e-3 --out gates/zh_math"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--granularity", choices=["layer", "model", "module"], default="layer",
                   help="one gate per layer (default, the paper's best), one for the model, or one per module")
    add_train_args(p, lr=1e-3, epochs=5, batch_size=4)
    p.set_defaults(func=_run_train_gate)


def _run_train_gate(args: argparse.Namespace) -> int:
    from loraflow.train.training import train_gate

    result = train_gate(
        args.base, parse_adapters(args.adapter), args.train, args.out, dev_path=args.dev,
        config=train_config_from_args(args), template=template_from_args(args),
        temperature=args.temperature or 1.0, granularity=args.granularity,
        init_gate=args.gate, torch_dtype=args.dtype, resume=args.resume, data_format=args.data_format,
    )
    print(f"trainable parameters: {result.trainable_parameters:,} (gates only)")
    print(f"best gate: {result.best_dir}  last: {result.last_dir}  log: {result.out_dir / 'train_log.json'}")
    return 0


@command
def _train_lora(sub) -> None:
    p = sub.add_parser(
        "train-lora",
        help="train one LoRA module with PEFT (standard PEFT output)",
        description=(
            "Train a LoRA adapter with PEFT on the same data formats. Defaults follow the released LoRAs: rank 64, "
            "alpha 16, dropout 0.1, all attention and MLP projections. OUT/best and OUT/last are standard PEFT "
            "adapter directories, loadable by PEFT and by loraflow."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base causal LM directory (or hub name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r (default: 64)")
    p.add_argument("--alpha", type=float, default=16, help="lora_alpha (default: 16)")
    p.add_argument("--dropout", type=float, default=0.1, help="lora_dropout (default: 0.1)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names (default: q,k,v,o,gate,up,down projections where present, "
                        "else all linear layers)")
    add_train_args(p, lr=2e-4, epochs=3, batch_size=16)
    p.set_defaults(func=_run_train_lora)


def _run_train_lora(args: argparse.Namespace) -> int:
    from loraflow.train.training import train_lora

    targets = [t.strip() for t in args.target_modules.split(",")] if args.target_modules else None
    result = train_lora(
        args.base, args.train, args.out, dev_path=args.dev, config=train_config_from_args(args),
        template=template_from_args(args), r=args.rank, alpha=args.alpha,
        dropout=args.dropout, target_modules=targets, torch_dtype=args.dtype, resume=args.resume,
        data_format=args.data_format,
    )
    print(f"trainable parameters: {result.trainable_parameters:,} (LoRA)")
    print(f"best adapter: {result.best_dir}  last: {result.last_dir}  log: {result.out_dir / 'train_log.json'}")
    return 0


@command
def score_command(sub: "argparse._SubParsersAction") -> None:
    """`loraflow score`: score a predictions file (MGSM math or translated HumanEval code), no model needed."""
    p = sub.add_parser(
        "score",
        help="score model outputs against a test file (math answers or sandboxed code execution)",
        description=(
            "Score model outputs with the official LoRA-Flow evaluation protocol. "
            "Math (MGSM): extract the final number from each output and compare it with the gold answer; "
            "'official' mode reproduces the authors' extraction exactly (signs and decimal points are dropped, "
            "gold answers with a thousands separator never match), 'strict' mode compares numbers by value. "
            "Code (HumanEval translated into zh/ru/es): post-process each output as the authors did, append it to "
            "the ORIGINAL ENGLISH HumanEval prompt of its task_id, add the tests and check(entry_point), and run it "
            "in an isolated subprocess (pass@1)."
        ),
        epilog=(
            "PRED.jsonl holds one JSON object per line of TEST.jsonl, in the same order, with the model's text "
            "in the field 'output'. RESULT.json records the score, per-example answers or execution statuses, "
            "the config and the versions. Example: loraflow score --task math --data zh_math_test.jsonl "
            "--predictions pred.jsonl --out result.json"
        ),
    )
    p.add_argument("--task", required=True, choices=["math", "code"], help="what the test file holds")
    p.add_argument("--data", required=True, metavar="TEST.jsonl",
                   help="test file: math rows with 'question'/'answer', code rows with 'task_id', 'prompt', 'test', 'entry_point'")
    p.add_argument("--predictions", required=True, metavar="PRED.jsonl",
                   help="one JSON object per test row, same order, model text in 'output'")
    p.add_argument("--mode", choices=["official", "strict"], default="official",
                   help="math answer matching: the authors' exact extraction, or numbers compared by value "
                        "(default: official; code is scored the same in both)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel code sandboxes (default: CPU count, at most 8)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per code program (default: 3.0)")
    p.add_argument("--out", required=True, metavar="RESULT.json", help="where to write the result (atomically)")
    p.add_argument("--method", help="recorded in the result for `loraflow report` (e.g. loraflow, avg, single:zh)")
    p.add_argument("--lang", help="recorded in the result for `loraflow report` (e.g. zh, ru, es)")
    add_seed(p)
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from loraflow.evaluation.scoring import score_file

    result = score_file(
        args.task, args.data, args.predictions, mode=args.mode, out_path=args.out,
        workers=args.workers, timeout=args.timeout, seed=args.seed,
        metadata={k: v for k, v in (("method", args.method), ("lang", args.lang)) if v is not None},
    )
    print(f"score: {result['correct']}/{result['total']} = {100 * result['score']:.1f}%")
    return 0


# ---------------------------------------------------------------------------- evaluation
@command
def _eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate one method on a test set (one cell of the paper's table)",
        description=(
            "Generate greedily for every test row with one method (base, single LoRA, avg, static weights, LoRAHub "
            "or LoRA-Flow), score with the official protocol, and write RESULT.json plus the raw outputs "
            "(RESULT.outputs.jsonl). Under `accelerate launch -m loraflow.cli eval ...` the test set is sharded "
            "over processes."
        ),
        epilog=(
            "examples (official files):\n"
            "  loraflow eval --base llama-2-7b --adapter zh=lora-zh --adapter math=lora-math --method loraflow \\\n"
            "      --gate zh_math.pt --temperature 1.1 --task math --lang zh \\\n"
            "      --data shared/loraflow-data/test/zh_math_test.jsonl --out results/zh_math_loraflow.json\n"
            "  loraflow eval ... --method lorahub --train shared/loraflow-data/train/zh_math_train.jsonl ...\n"
            "  loraflow eval --base llama-2-7b --method base --task code --lang es \\\n"
            "      --data shared/loraflow-data/test/es_code_test.jsonl --out results/es_code_base.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--method", required=True,
                   help="base, single:NAME, avg (equal weights), static:w1,w2,..., lorahub (needs --train) or "
                        "loraflow (needs --gate)")
    p.add_argument("--task", required=True, choices=["math", "code"])
    p.add_argument("--data", required=True, help="test JSONL (MGSM-style question/answer, or HumanEval-style)")
    p.add_argument("--lang", help="language code of the test set: zh, ru or es for the official prompts (any code "
                                  "with other templates; it labels the column in `loraflow report`)")
    p.add_argument("--out", required=True, help="RESULT.json path (raw outputs go to RESULT.outputs.jsonl)")
    p.add_argument("--train", help="few-shot set for --method lorahub")
    p.add_argument("--template", default="official",
                   help="official (the paper's evaluation prompts, default) or a training template: llama2, "
                        "released, paper, chat, plain")
    p.add_argument("--system", help="override the math system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default 512 (official)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", choices=["official", "strict"], default="official",
                   help="answer comparison: official (the authors' extraction) or strict (numbers by value)")
    p.add_argument("--limit", type=int, help="evaluate only the first N rows")
    p.add_argument("--workers", type=int, help="parallel code-execution sandboxes (default: CPU count, max 8)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program for code (default 3, official)")
    p.add_argument("--lorahub-budget", type=int, default=40, help="LoRAHub search evaluations (default 40)")
    p.add_argument("--label", help="row name in `loraflow report` (default: from --method)")
    p.add_argument("--adapter-role", choices=["language", "task"], help="for single:NAME, the paper's row name")
    p.add_argument("--no-progress", action="store_true")
    add_seed(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from loraflow.common.errors import LoraFlowError
    from loraflow.evaluation.harness import EvalConfig, evaluate

    try:
        cfg = EvalConfig(task=args.task, lang=args.lang, template=args.template, system=args.system,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, mode=args.mode,
                         limit=args.limit, temperature=args.temperature, workers=args.workers,
                         timeout=args.timeout, lorahub_budget=args.lorahub_budget, seed=args.seed)
    except ValueError as e:
        raise LoraFlowError(str(e)) from None
    adapters = parse_adapters(args.adapter) if args.adapter else []
    result = evaluate(args.base, adapters, args.method, args.data, args.out, cfg, gate=args.gate,
                      train_path=args.train, torch_dtype=args.dtype, device=args.device, label=args.label,
                      adapter_role=args.adapter_role, progress=not args.no_progress)
    if result:
        extra = f"  (LoRAHub weights: {result['lorahub']['reuse_as']})" if "lorahub" in result else ""
        print(f"{args.method} {args.task} {args.lang or ''}: {result['correct']}/{result['total']} = "
              f"{100 * result['score']:.1f}%  -> {args.out}{extra}")
    return 0


# ---------------------------------------------------------------------------- inspection
@command
def _inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="draw the per-layer, per-token fusion weights of a generation (heatmap PNG and CSV)",
        description=(
            "Generate greedily from a prompt with the gates on and draw, for each adapter, a heatmap of its "
            "fusion weight by layer (rows) and generated token (columns), as in the paper's analysis."
        ),
        epilog=(
            "example:\n  loraflow inspect --base B --adapter zh=lora/zh --adapter math=lora/math --gate gates/zh_math \\\n"
            "      --prompt '[INST] ... [/INST]' --out weights.png --csv weights.csv"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt, used as given")
    p.add_argument("--out", required=True, help="heatmap PNG path")
    p.add_argument("--csv", help="also write the weights as CSV (layer, token_index, token, w_<adapter>...)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--title", help="figure title")
    add_seed(p)
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    import torch

    from loraflow.core.inspection import inspect_prompt

    torch.manual_seed(args.seed)
    model, tokenizer = build_model_from_args(args)
    trace = inspect_prompt(model, tokenizer, args.prompt, args.out, csv_path=args.csv,
                           max_new_tokens=args.max_new_tokens, title=args.title)
    mean = trace.weights.mean(dim=(0, 1)).tolist()
    summary = ", ".join(f"{n} {w:.3f}" for n, w in zip(trace.adapter_names, mean))
    print(trace.text)
    print(f"{len(trace.tokens)} tokens x {trace.weights.shape[0]} layers; mean weights: {summary}")
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


# ---------------------------------------------------------------------------- demo
@command
def _demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole paper in miniature on a CPU: world, base, LoRAs, gate, baselines, table, heatmap",
        description=(
            "Build a seeded synthetic bilingual world, pretrain a tiny Llama on it, train a language LoRA and a "
            "math LoRA, train a LoRA-Flow gate on 200 foreign-language problems, evaluate Base, each LoRA, Avg, "
            "LoRAHub and LoRA-Flow on 250 held-out problems, and print the table. Every step after pretraining "
            "runs the same loraflow command a user would (printed as it runs). No network, no GPU."
        ),
        epilog=("examples:\n  loraflow demo                      # ~3 min on 2 cores, writes ./loraflow-demo\n"
                "  loraflow demo --quick --out /tmp/d # ~80 s, smaller and weaker\n"
                "  loraflow demo --seed 1 --force     # another world, every step redone"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="loraflow-demo", help="artifact directory (default: ./loraflow-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (under 90 s; used by CI)")
    p.add_argument("--force", action="store_true", help="redo every step instead of reusing finished ones")
    add_seed(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from loraflow.demo.pipeline import run_demo

    start = time.time()
    summary = run_demo(args.out, seed=args.seed, quick=args.quick, force=args.force)
    print()
    print(summary["table"])
    print(f"artifacts in {summary['out_dir']}/ (report/table.md, report/table.png, fusion_weights.png, "
          f"results/*.json); total {time.time() - start:.0f}s")
    return 0
