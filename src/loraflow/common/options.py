"""Declaring an option once: a dataclass field with its default, help text and CLI hints.

Library configs (`TrainConfig`, `EvalConfig`, ...) declare their fields with `option(...)`; the
CLI derives its flags, defaults and help from them (`loraflow.cli.args`), so a default or a help
string is written in exactly one place. Pure Python: nothing heavy is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

REQUIRED = dataclasses.MISSING


def option(default: Any = REQUIRED, help: str = "", *, factory: Any = None, flag: str | None = None,
           metavar: str | None = None, choices: Sequence[str] | None = None, cli: bool = True,
           repeat: bool = False) -> Any:
    """A dataclass field carrying its CLI description.

    Args:
        default: the one default (REQUIRED: the option must be given).
        help: what the option means; the CLI appends the default.
        factory: a default factory instead of `default` (for lists).
        flag: the CLI flag when it is not `--field-name` (e.g. "--no-progress" for a True boolean).
        metavar, choices: as in argparse.
        cli: False keeps the field out of the command line (API-only settings).
        repeat: the flag may be given several times; values are collected into a list.
    """
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": tuple(choices) if choices else None,
                "cli": cli, "repeat": repeat}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def override(base: type, name: str, default: Any) -> Any:
    """Field `name` of dataclass `base` with another default (same help), for a specialised config."""
    inherited = base.__dataclass_fields__[name]
    return dataclasses.field(default=default, metadata=inherited.metadata)
