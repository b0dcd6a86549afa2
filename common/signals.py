"""Holding stop signals off for a few steps that must not stop halfway, and stop signals
ending work as Ctrl-C does (so that cleanups run).

Stop signals: Ctrl-C (SIGINT), SIGTERM, and SIGHUP, which a closed terminal or a dropped SSH
session sends (it ended a simulation without stopping the Flower and Ray processes it had
started). A signal the process ignores stays ignored: under `nohup`, SIGHUP stops nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _heeded(signals) -> list[int]:
    """Those of `signals` that the process does not ignore."""
    return [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]


@contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Hold the stop signals off meanwhile (main thread only, where Python runs signal
    handlers: elsewhere no KeyboardInterrupt lands either); yields the list of those that came
    meanwhile, for the caller to act on once the handlers are put back."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _heeded(STOP_SIGNALS)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt meanwhile, so cleanups run as on Ctrl-C (main
    thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in _heeded(STOP_SIGNALS) if sig != signal.SIGINT}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
