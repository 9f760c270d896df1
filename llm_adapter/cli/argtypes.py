"""argparse value types shared by the commands (and by methods adding their own options)."""

from __future__ import annotations

import argparse
import re

__all__ = ["device", "group_size", "nonneg_float", "positive_int"]


def _checked(text: str, convert, ok, expected: str):
    """``convert(text)`` if it satisfies `ok`, else :class:`argparse.ArgumentTypeError`."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        shown = value if convert is int else repr(text)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {shown}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1."""
    return _checked(text, int, lambda v: v >= 1, "a positive integer")


def group_size(text: str) -> int:
    """-1 (per-channel) or an int >= 1."""
    return _checked(text, int, lambda v: v == -1 or v >= 1, "-1 (per-channel) or a positive integer")


def nonneg_float(text: str) -> float:
    """A float >= 0."""
    return _checked(text, float, lambda v: v >= 0, "a number >= 0")


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text
