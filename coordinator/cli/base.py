"""`fedprefix base`: list the registry, fetch the built-in model, show one base."""

from __future__ import annotations

import json
import time

import typer
from fedprefix.common.config import DEFAULT_BASE
from fedprefix.common.errors import FedPrefixError
from rich.markup import escape
from rich.table import Table

from .main import app, console, fail

base_app = typer.Typer(
    help="Base models: list the registry, fetch the built-in model, show one.",
    no_args_is_help=True,
    suggest_commands=False,
)
app.add_typer(base_app, name="base")


@base_app.command("list")
def base_list(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List the registry's base models and whether each is ready offline.

    Example: fedprefix base list
    """
    from fedprefix.common.base_registry import REGISTRY, fetch_problem, registry_folder

    rows = []
    for entry in REGISTRY.values():
        ready = entry.builtin or fetch_problem(registry_folder(entry.name)) is None
        rows.append({"name": entry.name, "ready": ready, "in_process": entry.builtin, "description": entry.description})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="base models")
    for column in ("name", "ready", "description"):
        table.add_column(column)
    for row in rows:
        status = "in-process" if row["in_process"] else ("fetched" if row["ready"] else "run: fedprefix base fetch")
        table.add_row(row["name"], status, row["description"])
    console.print(table)


@base_app.command("fetch")
def base_fetch(name: str = typer.Argument(DEFAULT_BASE, help="Registry name.")) -> None:
    """Make a registry model available offline (converts the built-in GGUF once, ~30 s).

    Example: fedprefix base fetch smollm2-135m-instruct
    """
    from fedprefix.common import base_model, base_registry

    try:
        started = time.perf_counter()
        with console.status(f"fetching {name} (first time: download and convert, about 30 s)"):
            folder = base_registry.fetch(name)
            base = base_model.load_base(name)
        console.print(f"{name}: ready in {folder} ({time.perf_counter() - started:.1f} s)", markup=False)
        console.print(f"fingerprint {base.fingerprint}")
    except FedPrefixError as exc:
        fail(exc)


@base_app.command("info")
def base_info(
    name: str = typer.Argument(DEFAULT_BASE, help="Registry name, folder or hub id."),
    tokens: int = typer.Option(16, "--tokens", "-p", min=1, max=1_000_000, help="Prefix length P to size."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show a base's architecture, fingerprint and the size of a prefix for it.

    Example: fedprefix base info tiny-llama --tokens 8
    """
    from fedprefix.common import base_model

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
        console.print(f"[bold]{key}[/bold]: {escape(str(value))}")
