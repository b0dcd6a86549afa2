"""The `fedprefix` app itself: the --debug switch, the consoles and the one error printer.

Library code raises FedPrefixError; the CLI alone prints and exits. Every error is one
line on stderr and exit code 1, also one raised by a dependency; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import logging

import typer
from fedprefix.common.errors import FedPrefixError
from fedprefix.coordinator.views import make_console
from rich.markup import escape

console = make_console()
err_console = make_console(stderr=True)

app = typer.Typer(
    name="fedprefix",
    help="Federated per-user personalization of a frozen language model with prefix tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}
DTYPE_HELP = (
    "Compute dtype: auto (bfloat16 only where this hardware computes it natively and faster), float32, bfloat16."
)


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """fedprefix: personal prefixes that never leave the device."""
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _print_error(exc: BaseException, hint: str = "") -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    # escaped: a message quoting a path or a hint such as 'fedprefix[parquet]' is not rich markup
    err_console.print(f"[red]error:[/red] {escape(message + hint)}", highlight=False, soft_wrap=True)


def run() -> None:
    """The console entry point: an error nobody caught is still one line (the traceback with --debug)."""
    try:
        app()
    except Exception as exc:  # errors from dependencies too (a missing package, a refused file)
        if _state["debug"]:
            raise
        named = exc if isinstance(exc, FedPrefixError) else f"{type(exc).__name__}: {exc}"
        _print_error(named, " (run with --debug for the traceback)")
        raise SystemExit(1) from None


def fail(exc: Exception) -> None:
    """Print one clear line (or raise, for the traceback, with --debug) and exit 1."""
    if _state["debug"]:
        raise exc
    _print_error(exc)
    raise typer.Exit(1)
