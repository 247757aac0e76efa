"""Checks for numbers that come from users or files: finite, of the right kind, and in range.

Each check raises `ValueError` with `name: problem` (config dataclasses turn that into an option
error); `NaN` fails every check, unlike a bare `value <= 0`, which NaN passes.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int: a whole number (not a bool, not a float) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
    return value


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float within the interval; `low_open` / `high_open` exclude the end points."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name}: must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def check_positive(name: str, value) -> float:
    """A finite number > 0 (learning rates, temperatures, timeouts)."""
    return check_float(name, value, low=0.0, low_open=True)
