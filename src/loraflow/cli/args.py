"""Command-line flags derived from config dataclasses (see `loraflow.common.options`).

`add_options(parser, Config)` adds one flag per field, with the field's default and help;
`build(Config, args)` turns the parsed namespace back into the config, so validation lives in
the config's `__post_init__` and its errors name the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from loraflow.common.errors import LoraFlowError


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _scalar_type(annotation: Any) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a field annotation like `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])[0], True
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], False
    return annotation, False


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return "" if f.default_factory is not dataclasses.MISSING else " (required)"
    if f.default is None or f.default is False:
        return ""
    if f.default is True:
        return ""
    return f" (default: {f.default})"


def _is_option(f: dataclasses.Field) -> bool:
    return bool(f.metadata) and f.metadata.get("cli", True) and "help" in f.metadata


def add_options(parser: argparse.ArgumentParser | Any, config: type, *, skip: tuple[str, ...] = (),
                required: tuple[str, ...] = ()) -> None:
    """Add a flag for every CLI field of the dataclass `config` (except `skip`)."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name in skip or not _is_option(f):
            continue
        meta = f.metadata
        kind, _ = _scalar_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": (meta["help"] + _default_text(f)).replace("%", "%%")}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if kind is bool and not meta.get("repeat"):
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            kwargs["type"] = kind
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("repeat"):
                kwargs["action"] = "append"
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default or f.name in required:
            kwargs["required"] = True
        parser.add_argument(flag_of(f), **kwargs)
    defaults = {}
    for f in dataclasses.fields(config):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name not in skip and _is_option(f) and has_default:
            defaults[f.name] = _default(f)
    parser.set_defaults(**defaults)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build(config: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The `config` dataclass from parsed flags (+ `extra` fields); a bad value names its flag."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
              if _is_option(f) and hasattr(args, f.name)}
    values.update(extra)
    try:
        return config(**values)
    except (ValueError, TypeError) as e:
        raise LoraFlowError(_name_flag(config, str(e))) from None


def _name_flag(config: type, message: str) -> str:
    """Rewrite 'field: problem' (the configs' validation style) as '--flag: problem'."""
    name, sep, rest = message.partition(":")
    for f in dataclasses.fields(config):
        if sep and f.name == name.strip():
            return f"{flag_of(f)}:{rest}"
    return message
