"""The `fedprefix` app itself: the --debug switch, the consoles and the one error printer.

Library code raises FedPrefixError; the CLI alone prints and exits. Every error is one
line on stderr and exit code 1, also one raised by a dependency; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import click
import typer
from fedprefix.common.errors import FedPrefixError
from fedprefix.coordinator.views import make_console, plain

console = make_console()
err_console = make_console(stderr=True)

app = typer.Typer(
    name="fedprefix",
    help="Federated per-user personalization of a frozen language model with prefix tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    suggest_commands=False,  # click already adds "Did you mean ...?": typer's would say it twice
)

_state = {"debug": False}
INTERRUPTED = 130  # the exit code of a command that Ctrl-C or SIGTERM stopped (the shell's for SIGINT)
DTYPE_HELP = (
    "Compute dtype: auto (bfloat16 only where this hardware computes it natively and faster), float32, bfloat16."
)
ALLOWED_HOST_HELP = (
    "A Host name clients may call this server by, beyond loopback names (repeat it; '*': any). "
    "Bound to loopback it answers only loopback names (DNS rebinding); bound elsewhere, any unless listed."
)
CERT_HELP, KEY_HELP = "TLS certificate chain (PEM), with --ssl-keyfile.", "TLS private key (PEM), with --ssl-certfile."


def dtype_option(value: str) -> str:
    """--dtype's check: a bad value is a usage error (exit 2, naming --help), before anything loads."""
    from fedprefix.common.precision import DTYPE_CHOICES  # torch: only for the commands that take --dtype

    if value not in DTYPE_CHOICES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return value


def finite_option(value: float | None) -> float | None:
    """A float option's check: NaN passes typer's min/max (every comparison with it is False),
    and --wrong-key-backoff nan would switch the wrong-key lockout off."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value!r} is not a finite number")
    return value


def usage_error(message: str) -> NoReturn:
    """A value that no option's own check could judge (a run setting's rule, a --set pair): exit 2
    and one line naming the command's --help, as click's own usage errors."""
    raise click.UsageError(message, ctx=click.get_current_context(silent=True))


def non_empty_path(value: str | None) -> str | None:
    """A path option's check: an empty string would mean the current folder, silently."""
    if value is not None and not value.strip():
        raise typer.BadParameter("an empty path; name a folder (use . for the current one)")
    return value


def _print_version(wanted: bool) -> None:
    """--version: fedprefix's version and the versions its runs depend on, then exit."""
    if wanted:
        from importlib.metadata import PackageNotFoundError, version

        def of(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "not installed"

        names = ("fedprefix", "torch", "transformers", "flwr", "ray")
        console.print(" ".join(f"{name} {of(name)}" for name in names), highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Show the versions and exit."
    ),
) -> None:
    """fedprefix: personal prefixes that never leave the device."""
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def warn(message: str) -> None:
    """A warning on stderr, printed as written (not as rich markup: see _print_error)."""
    err_console.print(f"[yellow]warning:[/yellow] {plain(message)}", highlight=False)


def _print_error(exc: BaseException, hint: str = "") -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    # plain: a message quoting a path or a hint such as 'fedprefix[parquet]' is not rich markup,
    # nor may a name in it (a run's, a file's) send the terminal escape codes
    err_console.print(f"[red]error:[/red] {plain(message + hint)}", highlight=False)


def run() -> None:
    """The console entry point: an error nobody caught is still one line (the traceback with --debug).

    Click's own handling is off (standalone_mode=False) so that a bad option or value is one
    line too, not a usage box; its exit codes stay: 2 for usage, and 130 (the shell's for SIGINT)
    with "aborted" where Ctrl-C stopped a command (SIGTERM too: see run in __init__.py).
    """
    try:
        code = app(standalone_mode=False, prog_name="fedprefix")
    except click.exceptions.NoArgsIsHelpError:  # `fedprefix` or `fedprefix store` alone: the help is printed
        raise SystemExit(2) from None
    except click.UsageError as exc:  # an unknown option, a value of the wrong type or range
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        _print_error(exc.format_message(), where)
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:  # Ctrl-C while the commands load, or at a prompt
        code = INTERRUPTED
    except Exception as exc:  # errors from dependencies too (a missing package, a refused file)
        if _state["debug"]:
            raise
        named = exc if isinstance(exc, FedPrefixError) else f"{type(exc).__name__}: {exc}"
        _print_error(named, " (run with --debug for the traceback)")
        raise SystemExit(1) from None
    if code == INTERRUPTED:  # typer ends a command that KeyboardInterrupt stopped so: say why
        err_console.print("aborted", highlight=False)
    raise SystemExit(code if isinstance(code, int) else 0)  # typer.Exit(code), e.g. fail(): 1; as click's own exit


def http_exposure(
    host: str, port: int | None, allowed: list[str], certfile: str | None, keyfile: str | None
) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers (common.http_guards.allowed_hosts), once its
    TLS files are checked and `port` (None: not here) found free; warns where it would listen
    beyond this machine without TLS."""
    from fedprefix.common.http_guards import allowed_hosts, check_tls, is_loopback

    try:
        check_tls(certfile, keyfile)
    except FedPrefixError as exc:
        fail(exc)
    if port is not None:
        require_free_port(host, port)
    if not is_loopback(host) and certfile is None:
        warn(f"listening on {host} without TLS: requests and answers cross the network as clear text")
    return allowed_hosts(host, allowed)


def require_free_port(host: str, port: int) -> None:
    """One clear line where `host:port` cannot be listened on (taken, or not an address of this
    machine), before anything loads; the server would otherwise log its own error first."""
    import errno
    import os
    import socket

    bound = 0
    try:  # as asyncio's create_server (uvicorn's) binds: every address of the host, skipping absent ones
        # "" is every interface to uvicorn (asyncio), as AI_PASSIVE makes it here
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in found:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as exc:
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
                    continue
                bound += 1
        if not bound:
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    except OSError as exc:
        why = {errno.EADDRINUSE: " (is the port in use?)", errno.EADDRNOTAVAIL: " (not an address of this machine)"}
        reason = "unknown host" if isinstance(exc, socket.gaierror) else (exc.strerror or str(exc))
        fail(FedPrefixError(f"could not listen on {host}:{port}: {reason}{why.get(exc.errno, '')}"))


def fail(exc: Exception) -> None:
    """Print one clear line (or raise, for the traceback, with --debug) and exit 1."""
    if _state["debug"]:
        raise exc
    _print_error(exc)
    raise typer.Exit(1)
