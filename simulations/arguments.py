"""argparse types the simulations' and benchmarks' command lines share."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """A count of at least 1 (users, rounds, steps, repeats): 0 or less is refused by name, where
    it would otherwise end in a traceback (no median of no timings) or a run that does nothing."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value
