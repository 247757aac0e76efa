"""Numeric checks: NaN, infinities, bools and out-of-range values are all refused."""

from __future__ import annotations

import math

import pytest

from loraflow.common.checks import check_float, check_int, check_positive


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -1.0, "1e-3", None, True])
def test_positive_refuses_nan_inf_zero_and_non_numbers(bad):
    with pytest.raises(ValueError, match="^lr: "):
        check_positive("lr", bad)


def test_ranges_and_kinds():
    assert check_positive("lr", 1e-3) == 1e-3
    assert check_float("dropout", 0.0, low=0.0, high=1.0, high_open=True) == 0.0
    with pytest.raises(ValueError, match="dropout: must be < 1"):
        check_float("dropout", 1.5, low=0.0, high=1.0, high_open=True)
    assert check_int("rank", 8, low=1) == 8
    for bad in (0, -1, 2.0, "8", False):
        with pytest.raises(ValueError, match="^rank: "):
            check_int("rank", bad, low=1)
