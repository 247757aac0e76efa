"""`loraflow`: the parser (verbs in workflow order) and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loraflow import __version__
from loraflow.cli import demo, evaluation, gates, generate, serve, training
from loraflow.common.errors import LoraFlowError

# Workflow order: what `loraflow --help` lists, first to last.
VERBS = [
    demo.add_demo,
    training.add_train_lora,
    training.add_train_gate,
    gates.add_convert_gate,
    generate.add_generate,
    generate.add_inspect,
    evaluation.add_eval,
    evaluation.add_score,
    evaluation.add_report,
    serve.add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraflow",
        description="LoRA-Flow: fuse several LoRA adapters of one causal LM per token with trained gates.",
    )
    parser.add_argument("--version", action="version", version=f"loraflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in VERBS:
        add(sub)
    return parser


# Options whose value is a string of another program's options: "--vllm-args --enforce-eager" would make
# argparse read "--enforce-eager" as an option of ours, so such a value is glued on ("--vllm-args=...").
PASS_THROUGH = ("--vllm-args",)


def glue_pass_through(argv: Sequence[str]) -> list[str]:
    """argv with each pass-through option's next word attached as its value."""
    out, words = [], iter(argv)
    for word in words:
        value = next(words, None) if word in PASS_THROUGH else None
        out.append(word if value is None else f"{word}={value}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(glue_pass_through(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except LoraFlowError as e:
        print(f"loraflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
