"""The `fedprefix` command: the one thin layer allowed to call into client, coordinator and serving.

main.py        the app, --debug, the one error printer
base.py        fedprefix base list | fetch | info
federation.py  fedprefix simulate | runs | show | dashboard
serve.py       fedprefix serve
store.py       fedprefix store list | verify | rotate-key | export-peft

Importing the commands needs no torch (each command imports what it needs when it runs), so
`fedprefix --help` answers at once. The entry point imports them under its Ctrl-C handling.
"""

from __future__ import annotations

import sys

from fedprefix.common.signals import stop_signals_as_interrupt


def _load_commands():
    """The app with every command registered on it (each module adds its own)."""
    from . import base, federation, serve, store  # noqa: F401
    from .main import app, run

    return app, run


def run() -> None:
    """The console entry point: Ctrl-C while the commands import is `aborted` too, not a traceback.

    SIGTERM stops a command as Ctrl-C does, so that its cleanups run (a base's half-converted
    folder, say); `serve` and `dashboard` set their own handlers, which stop them cleanly. A
    character the terminal's encoding cannot show (LC_ALL=C, Latin-1) is written escaped: a
    table or a run name with one had failed the whole command."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from fedprefix.coordinator.views import progress_bars_on_terminals_only

    progress_bars_on_terminals_only()
    with stop_signals_as_interrupt():
        try:
            _, run_app = _load_commands()
        except KeyboardInterrupt:
            sys.stderr.write("aborted\n")
            raise SystemExit(130) from None  # as main.INTERRUPTED (not imported: the import is what stopped)
        run_app()


def __getattr__(name: str):
    """`from fedprefix.coordinator.cli import app`: the app with its commands (PEP 562)."""
    if name == "app":
        return _load_commands()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "run"]
