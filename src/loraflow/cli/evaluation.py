"""`loraflow eval`, `loraflow score` and `loraflow report`: the paper's evaluation protocol."""

from __future__ import annotations

import argparse

from loraflow.cli.args import add_options, build
from loraflow.core.config import ModelOptions
from loraflow.core.devices import RuntimeOptions
from loraflow.evaluation.harness import EvalConfig, EvalRun
from loraflow.evaluation.scoring import ScoreOptions


def add_eval(sub) -> None:
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
    add_options(p, ModelOptions)
    add_options(p, EvalRun)
    add_options(p, EvalConfig)
    add_options(p, RuntimeOptions)
    p.add_argument("--engine", choices=("default", "vllm"), default="default",
                   help="default: loraflow's transformers engine; vllm: vLLM with the loraflow plugin, in this "
                        "process (needs vLLM: pip install 'loraflow[vllm]') (default: default)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from loraflow.evaluation.harness import evaluate

    build(RuntimeOptions, args).apply()
    model, run = build(ModelOptions, args), build(EvalRun, args)
    cfg = build(EvalConfig, args, temperature=model.temperature)
    device = model.torch_device()
    result = evaluate(model.base_path, model.adapters, run.method, run.data, run.out, cfg, gate=model.gate,
                      train_path=run.train, torch_dtype=model.torch_dtype(device), device=device, label=run.label,
                      adapter_role=run.adapter_role, progress=run.progress, force=run.force,
                      engine=args.engine, compile_model=model.compile)
    if result:
        extra = f"  (LoRAHub weights: {result['lorahub']['reuse_as']})" if "lorahub" in result else ""
        print(f"{run.method} {cfg.task} {cfg.lang or ''}: {result['correct']}/{result['total']} = "
              f"{100 * result['score']:.1f}%  -> {run.out}{extra}")
    return 0


def add_score(sub) -> None:
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
    add_options(p, ScoreOptions)
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    from loraflow.evaluation.scoring import score_file

    opts = build(ScoreOptions, args)
    result = score_file(
        opts.task, opts.data, opts.predictions, mode=opts.mode, out_path=opts.out, workers=opts.workers,
        timeout=opts.timeout, seed=opts.seed, isolation=opts.isolation,
        metadata={k: v for k, v in (("method", opts.method), ("lang", opts.lang)) if v is not None},
        force=opts.force,
    )
    print(f"score: {result['correct']}/{result['total']} = {100 * result['score']:.1f}%")
    return 0


def add_report(sub) -> None:
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
            "  loraflow report runs/ --paper --lang-name 'han=Han (generated)'  # the paper's table after ours\n"
            "\nA directory contributes its *.json files that look like results (have 'method' and "
            "'score');\nother JSON there is skipped with a warning naming it on stderr. Files named explicitly "
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
    p.add_argument("--lang-name", action="append", metavar="CODE=NAME", default=[],
                   help="display name of a language column (default: zh=Zh, ru=Ru, es=Es, and for the demo's "
                        "generated languages han='Han (as Zh)', cyr='Cyrillic (as Ru)', lat='Latin (as Es)'; "
                        "other codes capitalised); the CSV keeps the codes; repeatable")
    p.add_argument("--paper", action="store_true",
                   help="after our table, print (and write into the Markdown file) the paper's published table "
                        "(Table 1, Llama-2-7B), labelled as such; never mixed into the CSV or chart")
    p.add_argument("--seed", type=int, default=0, help="accepted for uniformity with the other commands; unused")
    p.add_argument("--force", action="store_true",
                   help="replace output files that loraflow did not write (or that were changed since)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    import sys

    from loraflow.evaluation.report import parse_lang_names, parse_task_names, write_report

    rep = write_report(
        args.inputs, out_dir=args.out_dir, md=args.md, csv_path=args.csv, png=args.png,
        title=args.title, task_names=parse_task_names(args.task_name), force=args.force,
        lang_names=parse_lang_names(args.lang_name), paper=args.paper,
    )
    sys.stdout.write(rep.markdown)
    for why in rep.skipped:
        print(f"loraflow report: warning: skipped {why}", file=sys.stderr)
    for note in rep.table.notes:
        print(f"loraflow report: warning: {note}", file=sys.stderr)
    for path in rep.written:
        print(f"loraflow report: wrote {path}", file=sys.stderr)
    return 0
