"""Checks of numeric settings given by a user (config keys, command-line options): a value that is
not a finite number in its range stops the run with an :class:`noduleflow.io.InputError` naming the
key."""

from __future__ import annotations

import math
from numbers import Real

from noduleflow.io import InputError


def check_number(value: object, key: str, low: float, high: float = math.inf, note: str = "") -> None:
    """InputError ``"{key} = {value!r} must be a number ..."`` unless ``value`` is a real number (not a
    bool, not a string) that is finite and lies in ``[low, high]``; ``note`` is appended to the
    message (e.g. what a special value means)."""
    ok = (isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
          and low <= float(value) <= high)
    if not ok:
        bounds = f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}]"
        raise InputError(f"{key} = {value!r} must be a number {bounds}{f' ({note})' if note else ''}")
