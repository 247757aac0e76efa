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
