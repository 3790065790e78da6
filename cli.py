"""Command-line plumbing shared by every step script: input errors, exit codes, logging.

Bad input raises :class:`InputError` anywhere in the code; :func:`run_cli` turns it into one line
on stderr and exit status 2 (DESIGN section 7). Scripts validate everything before writing any
artifact, and write artifacts atomically (``rm_data.atomic_path``), so a failed run leaves none.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence

# ORM objectives (README, "Step 5"): here, not in networks.py, so steps parse flags before importing torch.
OBJECTIVES = ("bt", "clf")


class InputError(ValueError):
    """A user-facing problem with an input file, flag or environment variable."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; report an :class:`InputError` as one stderr line and exit with 2."""
    try:
        main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def setup_logging() -> None:
    """Progress logs go to stdout, so stderr carries only errors (and tqdm bars)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True, stream=sys.stdout)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors raised as :class:`InputError` (one line, exit 2, callable in-process)."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse API
        raise InputError(f"{self.prog}: {message}")


def finite_float(text: str) -> float:
    """argparse type: a finite float (rejects nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
