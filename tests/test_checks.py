"""Numeric settings are checked once, in noduleflow.checks: the message names the key and the range."""

import math

import numpy as np
import pytest

from noduleflow.checks import check_number
from noduleflow.io import InputError


@pytest.mark.parametrize("value", [0, 0.0, 2, 2.5, np.float32(1.5), np.int64(3), 4.0])
def test_numbers_in_range_pass(value):
    check_number(value, "predict.some_key", 0.0, 4.0)


@pytest.mark.parametrize("value", [-0.1, 4.01, math.nan, math.inf, "2", True, None, [1.0]])
def test_anything_else_is_refused_naming_key_and_range(value):
    with pytest.raises(InputError, match=r"predict\.some_key = .* must be a number in \[0, 4\] \(what 0 means\)"):
        check_number(value, "predict.some_key", 0.0, 4.0, note="what 0 means")


def test_an_open_range_says_so():
    with pytest.raises(InputError, match=r"must be a number >= 1$"):
        check_number(0.5, "train.key", 1.0)
