"""Command-line argument types and the parser every command uses (``qcore.cli`` and
``qcore.bench`` both build on it, so neither imports the other's module for it).

Numbers are read as a link reads them: ASCII digits only, finite.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import NoReturn, TypeVar

from qcore.config import MAX_PRUNE, MAX_SEED, parse_bits, parse_number

__all__ = ["Parser", "whole_number", "natural", "positive", "seed_arg", "rate_arg", "bits_arg",
           "number_arg"]  # fmt: skip

T = TypeVar("T")
_WHOLE = re.compile(r"-?[0-9]+")  # ASCII only: int() also takes "٤" and "²"-like digits


# ---------------------------------------------------------------------------------------------
# Argument types: whole numbers and numbers in ASCII digits only, read as in a link.


def whole_number(text: str) -> int:
    """An argparse type: a whole number written in ASCII digits (``int`` also takes ``"٤"``).

    >>> whole_number("12")
    12
    >>> whole_number("٤")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a whole number in the digits 0-9; got '٤'
    """
    if _WHOLE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"expected a whole number in the digits 0-9; got {text!r}")
    return int(text)


def natural(text: str) -> int:
    """An argparse type: a whole number from 0 (a count, an epoch number)."""
    n = whole_number(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0; got {text!r}")
    return n


def positive(text: str) -> int:
    """An argparse type: a whole number from 1 (a batch size, a number of draws)."""
    n = whole_number(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1; got {text!r}")
    return n


def seed_arg(text: str) -> int:
    """An argparse type: a random seed, 0 to 2^32 - 1 (as the configs take it)."""
    n = whole_number(text)
    if not 0 <= n <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {MAX_SEED}; got {text!r}")
    return n


def rate_arg(text: str) -> float:
    """An argparse type: a pruning rate from 0 to :data:`~qcore.config.MAX_PRUNE`, as a link
    takes it."""
    v = number_arg(text)
    if not 0.0 <= v <= MAX_PRUNE:
        raise argparse.ArgumentTypeError(
            f"expected a pruning rate from 0 to {MAX_PRUNE:g}; got {text!r}"
        )
    return v


def _flat(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse type from one of the flat-settings parsers the URL uses too."""

    def parse_arg(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_arg.__name__ = name
    return parse_arg


bits_arg = _flat(parse_bits, "bits")  # 1..16 in ASCII digits, or None for "float"
number_arg = _flat(parse_number, "number")  # finite, in ASCII


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error: ...`` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")
