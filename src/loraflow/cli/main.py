"""The `loraflow` command line: a thin map from subcommands to library functions.

The subcommands and their arguments live in `loraflow.cli.commands`; each runs through a
function that imports the heavy library code lazily, so `loraflow --help` and the model-free
commands (`score`, `report`) start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loraflow import __version__
from loraflow.cli.commands import REGISTRARS
from loraflow.common.errors import LoraFlowError


_HELP_ORDER = ["demo", "generate", "inspect", "convert-gate", "train-gate", "train-lora", "eval", "score", "report"]


def _help_position(register) -> int:
    name = register.__name__.strip("_").replace("_", "-")
    return _HELP_ORDER.index(name) if name in _HELP_ORDER else len(_HELP_ORDER)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraflow",
        description="LoRA-Flow: fuse several LoRA adapters of one causal LM per token with trained gates.",
    )
    parser.add_argument("--version", action="version", version=f"loraflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in sorted(REGISTRARS, key=_help_position):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
