"""`loraflow demo`."""

from __future__ import annotations

import argparse

from loraflow.cli.args import add_options, build
from loraflow.demo.pipeline import DemoOptions


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole paper in miniature on a CPU: world, base, LoRAs, gate, baselines, table, heatmap",
        description=(
            "Build a seeded synthetic bilingual world, pretrain a tiny Llama on it, train a language LoRA and a "
            "math LoRA, train a LoRA-Flow gate on 200 foreign-language problems, evaluate Base, each LoRA, Avg, "
            "LoRAHub and LoRA-Flow on 250 held-out problems, and print the table. Each step calls the library "
            "and prints the loraflow command that does the same. No network, no GPU."
        ),
        epilog=("examples:\n  loraflow demo                      # ~3 min on 2 cores, writes ./loraflow-demo\n"
                "  loraflow demo --quick --out /tmp/d # ~80 s, smaller and weaker\n"
                "  loraflow demo --seed 1 --force     # another world, every step redone"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, DemoOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from loraflow.demo.pipeline import run_demo

    opts = build(DemoOptions, args)
    start = time.time()
    summary = run_demo(opts.out, seed=opts.seed, quick=opts.quick, force=opts.force)
    print()
    print(summary["table"])
    print(f"artifacts in {summary['out_dir']}/ (report/table.md, report/table.png, fusion_weights.png, "
          f"results/*.json); total {time.time() - start:.0f}s")
    return 0
