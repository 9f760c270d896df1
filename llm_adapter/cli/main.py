"""The ``llm-adapter`` parser and entry point; one module per command."""

from __future__ import annotations

import argparse
import logging
import sys

from . import demo, evaluate, generate, quantize
from .common import CLIError

__all__ = ["build_parser", "main", "model_args"]

#: The commands, in ``--help`` order: each module has ``add_parser(sub, common)`` and ``run(args)``.
COMMANDS = (quantize, evaluate, generate, demo)


def model_args(p, *, quantized: bool) -> None:
    """``--model`` (and ``--quantized``) options shared by the commands."""
    from ..models import DEFAULT_MODEL

    help_model = (
        f"model to load: a built-in name (default {DEFAULT_MODEL!r}), a local directory saved with "
        "save_pretrained, a .gguf file, or a Hugging Face hub id"
    )
    if quantized:
        help_model += "; with --quantized: where to find the base model (default: the one recorded there)"
    p.add_argument("--model", default=None, help=help_model)
    if quantized:
        p.add_argument("--quantized", metavar="DIR", default=None,
                       help="a directory written by `quantize --out`")


def build_parser() -> argparse.ArgumentParser:
    """The ``llm-adapter`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="llm-adapter",
        description="Low-bit quantization of causal LMs with BILS solvers (bils).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    common = argparse.ArgumentParser(add_help=False)  # -v also after the command
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llm_adapter").setLevel(level)
    logging.getLogger("bils").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for argument errors).

    Run as the program (`argv` None: ``llm-adapter``, ``python -m llm_adapter``), it first caps
    glibc's malloc arenas at 2 for the process (:func:`llm_adapter.calibration.memory.limit_arenas`:
    the calibration's batch threads then reuse each other's freed memory) and fixes its mmap
    threshold at 4 MiB (:func:`~llm_adapter.calibration.memory.fix_mmap_threshold`: large
    activations are given back when freed instead of fragmenting the heap); called with an
    `argv` list (from Python, tests) it changes nothing process-wide."""
    if argv is None:
        from ..calibration.memory import fix_mmap_threshold, limit_arenas

        limit_arenas(2)
        fix_mmap_threshold()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"llm-adapter {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
