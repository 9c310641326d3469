"""argparse ``type`` functions: an option's value checked as it is parsed, with a one-line error.

The checks are the library's (``peft_ctrl._checks``), imported when a value is parsed rather than when the parsers
are built: the library's import loads torch and peft, and ``peft-ctrl seal verify --help`` must answer at once.
Every command that parses a checked value runs the library next, so the import costs nothing extra there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_arg(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        from peft_ctrl._checks import check_int

        try:
            return check_int("the value", int(text), low=low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None

    return parse


def float_arg(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number within the bounds (``*_open`` excludes the bound itself)."""

    def parse(text: str) -> float:
        from peft_ctrl._checks import check_float, range_text

        try:
            return check_float("the value", float(text), low, high, low_open=low_open, high_open=high_open)
        except ValueError:
            bounds = range_text(low, high, low_open, high_open)
            raise argparse.ArgumentTypeError(f"must be a finite number{bounds}, got {text!r}") from None

    return parse
