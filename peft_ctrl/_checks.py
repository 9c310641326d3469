"""Up-front checks of config fields and function arguments.

Every check raises ``ValueError`` with one sentence that names the field, the allowed values and what was
given, so a bad value is reported before any model is built (not as an error from deep inside torch).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The bounds in words for an error message: " in [0, 1)", " >= 1", " < 2" or "" (the command line's too)."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or not (value > high or (high_open and value == high))


def check_int(field: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]``; bools, floats (even 3.0) and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not _in_range(value, low, high, 0, 0):
        raise ValueError(f"{field} must be an integer{range_text(low, high, False, False)}, got {value!r}.")
    return int(value)


def check_float(
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` within the bounds (``*_open`` excludes the bound itself)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not _in_range(float(value), low, high, low_open, high_open):
        raise ValueError(
            f"{field} must be a finite number{range_text(low, high, low_open, high_open)}, got {value!r}."
        )
    return float(value)


def check_probability(field: str, value: Any) -> float:
    """A dropout probability: in [0, 1). 1 would zero the adapter input, so it is refused."""
    return check_float(field, value, 0.0, 1.0, high_open=True)


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be True or False, got {value!r}.")
    return value


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value
