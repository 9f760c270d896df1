"""argparse value types shared by the commands (and by methods adding their own options)."""

from __future__ import annotations

import argparse

__all__ = ["group_size", "nonneg_float", "positive_int"]


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def group_size(text: str) -> int:
    """-1 (per-channel) or an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 (per-channel) or a positive integer, got {text!r}") from None
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"expected -1 (per-channel) or a positive integer, got {value}")
    return value


def nonneg_float(text: str) -> float:
    """A float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value
