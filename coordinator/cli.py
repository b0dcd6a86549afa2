"""The `fedprefix` command: base models, stores, and (as they land) simulation and serving.

Library code raises FedPrefixError; this module alone prints and exits. Errors are one
line on stderr and exit code 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import signal
import time

import typer
from fedprefix.common import base_model
from fedprefix.common.errors import FedPrefixError
from fedprefix.coordinator.views import fmt_num, make_console
from rich.table import Table

console = make_console()
err_console = make_console(stderr=True)

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


@app.command()
def simulate(
    users: int = typer.Option(4, "--users", "-n", help="Simulated users (one Flower node each)."),
    rounds: int = typer.Option(3, "--rounds", "-r", help="Federated rounds."),
    base: str = typer.Option("tiny-llama", "--base", help="Base model: registry name, folder or hub id."),
    mode: str = typer.Option("shared+personal", "--mode", help="personal | shared | shared+personal"),
    out: str = typer.Option("runs/latest", "--out", help="Run folder to write (run.json, rounds.jsonl)."),
    aggregator: str = typer.Option("fedavg", "--aggregator", help="fedavg | fedadam | fedprox"),
    local_steps: int = typer.Option(10, "--local-steps", help="Optimizer steps per user per round."),
    examples: int = typer.Option(0, "--examples", help="Rows per user; 0 = non-IID sizes from 10 to 200."),
    dp_noise: float = typer.Option(0.0, "--dp-noise", help="DP noise multiplier (0 = off)."),
    dp_clip: float = typer.Option(1.0, "--dp-clip", help="DP clipping norm of each user's update."),
    setting: list[str] = typer.Option([], "--set", help="Any other run setting, KEY=VALUE (see pyproject)."),
    as_json: bool = typer.Option(False, "--json", help="Print the round records as JSON."),
) -> None:
    """Run a federation of simulated persona users on this machine (Flower simulation runtime).

    Example: fedprefix simulate --users 4 --rounds 3 --base tiny-llama --mode shared+personal --out runs/demo
    """
    from fedprefix.common.config import FederationConfig
    from fedprefix.coordinator.simulate import simulate as run_simulation
    from fedprefix.coordinator.views import round_progress
    from pydantic import ValidationError

    extra = {}
    for item in setting:
        key, sep, value = item.partition("=")
        if not sep:
            fail(ValueError(f"--set expects KEY=VALUE, got {item!r}"))
        extra[key.replace("-", "_")] = value
    try:
        config = FederationConfig(
            base=base,
            num_users=users,
            num_rounds=rounds,
            mode=mode,
            run_dir=out,
            aggregator=aggregator,
            local_steps=local_steps,
            examples_per_user=examples,
            dp_noise_multiplier=dp_noise,
            dp_clipping_norm=dp_clip,
            **extra,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(ValueError(f"setting {'.'.join(map(str, first['loc'])) or 'config'}: {first['msg']}"))
    try:
        title = f"simulating {users} users x {rounds} rounds on {base} ({mode})"
        # Rounds as they end; with --json on stderr, so stdout stays JSON.
        with round_progress(err_console if as_json else console, rounds, title) as on_round:
            records = run_simulation(config, on_round=on_round)
    except (FedPrefixError, RuntimeError) as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in records], indent=2))
        return
    from fedprefix.coordinator.views import rounds_table

    console.print(rounds_table(records))
    console.print(f"run folder: {out}")


@app.command()
def serve(
    base: str = typer.Option(base_model.DEFAULT_BASE, "--base", help="Base model: registry name, folder or hub id."),
    store: str = typer.Option(..., "--store", help="Encrypted prefix store folder (ciphertext only)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    max_batch_size: int = typer.Option(64, "--max-batch-size", help="Rows per decode step."),
    max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests before answering 429."),
    max_wait: float = typer.Option(30.0, "--max-wait", help="Seconds a request may wait for a batch slot."),
    cache_mib: int = typer.Option(1024, "--prefix-cache-mib", help="Memory for decrypted prefixes (LRU)."),
    static: bool = typer.Option(False, "--static-batching", help="Static instead of continuous batching."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="Weights to serve in: auto (bfloat16 where the hardware computes it natively, else float32), "
        "float32 or bfloat16.",
    ),
) -> None:
    """Serve many users' prefixes over one base: an OpenAI-compatible HTTP API.

    Example: fedprefix serve --base smollm2-135m-instruct --store store --port 8000
    then: curl localhost:8000/v1/completions -H "X-Prefix-Key: $KEY_B64" -H "Content-Type: application/json"
          -d '{"prompt": "Hello", "user": "alice", "max_tokens": 20}'
    """
    import uvicorn
    from fedprefix.common.store import PrefixStore
    from fedprefix.coordinator.serving import Engine
    from fedprefix.coordinator.serving.server import create_app, start_http

    try:
        loaded = base_model.load_base(base, dtype=base_model.serving_dtype(dtype))
        prefix_store = PrefixStore(store)
    except FedPrefixError as exc:
        fail(exc)
    engine = Engine(
        loaded,
        store=prefix_store,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_wait_s=max_wait,
        continuous=not static,
        prefix_cache_bytes=cache_mib << 20,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(engine, base), host=host, port=port, log_level="warning"))
    try:  # the engine computes on this (main) thread, the HTTP server answers on another: see Engine.run
        http = start_http(engine, server)
    except FedPrefixError as exc:
        fail(exc)
    console.print(f"serving {base} ({loaded.dtype}) with prefixes from {store} on http://{host}:{port}/v1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the same way on Ctrl-C and SIGTERM
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)


@app.command("runs")
def runs_command(
    runs: str = typer.Option("runs", "--runs", help="Folder holding run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List federated runs: id, mode, base, users, rounds done, last losses, status.

    Example: fedprefix runs --runs runs
    """
    from fedprefix.coordinator.runs import list_runs

    try:
        summaries = list_runs(runs)
    except FedPrefixError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps([s.model_dump() for s in summaries], indent=2))
        return
    table = Table(title=f"runs in {runs}")
    for column in ("id", "status", "mode", "base", "users", "rounds", "base loss", "shared", "personal"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            s.id,
            s.status,
            s.mode,
            s.base,
            str(s.users),
            f"{s.rounds_done}/{s.rounds_planned}",
            fmt_num(s.last_eval_loss_base),
            fmt_num(s.last_eval_loss_shared),
            fmt_num(s.last_eval_loss_personal),
        )
    console.print(table)
    for s in summaries:
        for problem in s.problems:
            err_console.print(f"[yellow]warning:[/yellow] {s.id}: {problem}", highlight=False)


@app.command("show")
def show_command(
    run: str = typer.Argument(..., help="Run id (folder name under --runs) or a path to a run folder."),
    runs: str = typer.Option("runs", "--runs", help="Folder holding run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """One run: the per-round table, the personalization gain and a sparkline of the losses.

    Example: fedprefix show demo --runs runs
    """
    from pathlib import Path

    from fedprefix.coordinator.records import read_run
    from fedprefix.coordinator.runs import load_run
    from fedprefix.coordinator.views import rounds_table, sparkline

    try:
        info, records, problems = read_run(run) if Path(run).is_dir() else load_run(runs, run)
    except FedPrefixError as exc:
        fail(exc)
    if as_json:
        typer.echo(
            json.dumps(
                {"run": info.model_dump(), "rounds": [r.model_dump() for r in records], "problems": problems}, indent=2
            )
        )
        return
    for problem in problems:
        err_console.print(f"[yellow]warning:[/yellow] {problem}", highlight=False)
    console.print(
        f"[bold]{run}[/bold]: {info.status}, mode {info.config.get('mode')}, base {info.base}, "
        f"{info.config.get('num_users')} users, {len(records)}/{info.config.get('num_rounds')} rounds"
    )
    console.print(rounds_table(records))
    for name in ("eval_loss_base", "eval_loss_shared", "eval_loss_personal", "train_loss"):
        values = [getattr(r, name) for r in records]
        console.print(
            f"{name:20s} {sparkline(values)}  {fmt_num(values[0] if values else None)} -> "
            f"{fmt_num(values[-1] if values else None)}"
        )
    if records and (gain := records[-1].personalization_gain) is not None:
        last = records[-1]
        shared_gain = last.eval_loss_base - (last.eval_loss_shared or last.eval_loss_base)
        console.print(
            f"personalization gain (base - personal loss): {gain:.3f} "
            f"({gain / last.eval_loss_base:.0%}); from the shared prefix alone: {shared_gain:.3f}"
        )


@app.command("dashboard")
def dashboard_command(
    runs: str = typer.Option("runs", "--runs", help="Folder holding run folders."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8050, "--port", help="Port to listen on."),
) -> None:
    """A read-only web dashboard of the runs (works offline; updates while a run goes on).

    Example: fedprefix dashboard --runs runs --port 8050, then open http://127.0.0.1:8050
    """
    from pathlib import Path

    import uvicorn
    from fedprefix.coordinator.dashboard.app import create_dashboard

    if not Path(runs).is_dir():
        fail(FedPrefixError(f"runs folder {runs} does not exist"))
    console.print(f"dashboard of {runs} on http://{host}:{port}")
    uvicorn.run(create_dashboard(runs), host=host, port=port, log_level="warning")


def _mount_subcommands() -> None:
    """Sub-command groups that live in their own modules."""
    from fedprefix.coordinator.store_cli import store_app

    app.add_typer(store_app, name="store")


_mount_subcommands()
