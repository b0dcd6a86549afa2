"""argparse types the simulations' and benchmarks' command lines share."""

from __future__ import annotations

import argparse
import importlib.util


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


def require(*modules: str, extra: str = "report") -> None:
    """Exit with one line naming what to install where an optional module is missing: at the
    start, not after minutes of training (peft and matplotlib are the `report` extra's)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"error: this needs {', '.join(missing)}, not installed: pip install 'fedprefix[{extra}]' "
            "(make test and make report install it)"
        )
