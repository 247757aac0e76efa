"""`loraflow demo`."""

from __future__ import annotations

import argparse

from loraflow.cli.args import add_options, build
from loraflow.demo.pipeline import DemoOptions


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the paper's whole table in miniature on a CPU: world, base, LoRAs, gates, baselines, table, heatmaps",
        description=(
            "Build a seeded synthetic world (English and three generated languages in three scripts, math and "
            "code), pretrain a tiny Llama on it, train three language LoRAs, a math and a code LoRA, train a "
            "LoRA-Flow gate per language-task cell on its 200 few-shot problems and one gate over all five LoRAs, "
            "evaluate Base, each LoRA, Avg, LoRAHub and LoRA-Flow on every cell's held-out problems (code runs in "
            "the sandbox), and print the paper-shaped table. Each step calls the library and prints the loraflow "
            "command that does the same. No network, no GPU."
        ),
        epilog=("examples:\n  loraflow demo                      # ~11 min on 2 cores, writes ./loraflow-demo\n"
                "  loraflow demo --quick --out /tmp/d # ~2 min, smaller and weaker\n"
                "  loraflow demo --seed 1 --force     # another world, every step redone"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, DemoOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from loraflow.core.devices import quiet_libraries
    from loraflow.demo.pipeline import run_demo

    opts = build(DemoOptions, args)
    quiet_libraries()  # the steps print their own progress; no library's loading bars between them
    start = time.time()
    summary = run_demo(opts.out, seed=opts.seed, quick=opts.quick, force=opts.force, isolation=opts.isolation)
    print()
    print(summary["table"])
    print(f"artifacts in {summary['out_dir']}/ (report/table.md, report/table.png, fusion_weights_math.png, "
          f"fusion_weights_code.png, results/*/*.json); total {time.time() - start:.0f}s")
    return 0
