"""`fedprefix simulate`, `runs`, `show` and `dashboard`: federations on this machine and their records."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from fedprefix.common.errors import FedPrefixError, did_you_mean, first_error
from fedprefix.coordinator.views import fmt_num, mode_label, numbers_table, plain
from rich.console import Console
from rich.markup import escape

from .main import (
    ALLOWED_HOST_HELP,
    CERT_HELP,
    DTYPE_HELP,
    KEY_HELP,
    app,
    console,
    dtype_option,
    err_console,
    fail,
    http_exposure,
    non_empty_path,
    usage_error,
    warn,
)

PERSONA_USERS = 4  # simulated personas without --users


@app.command()
def simulate(
    users: int = typer.Option(
        0, "--users", "-n", min=0, help="Users, one Flower node each (default: personas 4, your data all of its users)."
    ),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, help="Federated rounds."),
    base: str = typer.Option("tiny-llama", "--base", help="Base model: registry name, folder or hub id."),
    mode: str = typer.Option("shared+personal", "--mode", help="personal | shared | shared+personal"),
    out: str = typer.Option(
        "runs/latest", "--out", help="Run folder to write (run.json, rounds.jsonl).", callback=non_empty_path
    ),
    aggregator: str = typer.Option(
        "fedavg", "--aggregator", help="fedavg | fedadam | fedprox, or robust: krum | multikrum | trimmedavg | median"
    ),
    local_steps: int = typer.Option(
        10, "--local-steps", min=1, max=1_000_000, help="Optimizer steps per user per round."
    ),
    data: str = typer.Option(
        "personas",
        "--data",
        help="'personas' (simulated), a .jsonl/.csv/.parquet file with a user column, "
        "or a folder of per-user files or per-user folders.",
        callback=non_empty_path,
    ),
    user_field: str = typer.Option("user", "--user-field", help="The user column of a single data file."),
    min_rows: int = typer.Option(2, "--min-rows", min=1, help="Drop users with fewer rows."),
    eval_fraction: float = typer.Option(
        0.2, "--eval-fraction", help="Each user's last share of rows held out for evaluation (0: none)."
    ),
    users_per_round: int = typer.Option(
        0, "--users-per-round", "-k", min=0, help="Users sampled each round (0: all, or --set fraction-train=F)."
    ),
    examples: int = typer.Option(
        0, "--examples", min=0, help="personas: rows per user; 0 = non-IID sizes from 10 to 200."
    ),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP, callback=dtype_option),
    dp_noise: float = typer.Option(0.0, "--dp-noise", min=0, help="DP noise multiplier (0 = off)."),
    dp_clip: float = typer.Option(1.0, "--dp-clip", help="DP clipping norm of each user's update."),
    setting: list[str] = typer.Option(
        [],
        "--set",
        help="Any other run setting, KEY=VALUE: a FederationConfig field (common/config.py), dashed: max-length=96.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the round records as JSON."),
) -> None:
    """Run a federation on this machine (Flower simulation runtime): simulated personas or your data.

    Example: fedprefix simulate --data chats.jsonl --user-field user --users-per-round 8 --rounds 3 --out runs/mine
    """
    from fedprefix.coordinator.simulate import simulate as run_simulation
    from fedprefix.coordinator.views import round_progress

    extra = {}
    for item in setting:
        key, sep, value = item.partition("=")
        if not sep:
            usage_error(f"--set expects KEY=VALUE, got {item!r}")
        extra[key.replace("-", "_")] = value
    if "num_users" in extra:  # --set num-users=N is --users N (the data may then lower it)
        try:
            users = int(extra.pop("num_users"))
        except ValueError:
            usage_error("--set num_users: expected a whole number of users")
    settings = (
        dict(
            base=base,
            num_rounds=rounds,
            mode=mode,
            run_dir=out,
            aggregator=aggregator,
            local_steps=local_steps,
            data=data,
            user_field=user_field,
            min_rows=min_rows,
            eval_fraction=eval_fraction,
            users_per_round=users_per_round,
            dp_noise_multiplier=dp_noise,
            dp_clipping_norm=dp_clip,
            dtype=dtype,
        )
        | extra
    )  # --set KEY=VALUE wins over the option of the same setting
    out = str(settings["run_dir"])
    for name in ("run_dir", "data"):  # as --out and --data: blank would be the current folder
        if not str(settings[name]).strip():
            usage_error(f"--set {name}: an empty path; name a folder (use . for the current one)")
    try:
        per_round = int(settings["users_per_round"])
    except (TypeError, ValueError):
        per_round = 0  # the check below names the bad value
    personas = settings["data"] == "personas"
    users = (users or PERSONA_USERS) if personas else users
    # Settings first, so that a bad one is refused before any data is read or written (own data:
    # with as many users as needed, until it is read); then again with the users the data holds.
    config = _checked({**settings, "num_users": users if personas else max(users, per_round, 1)})
    if personas:
        from fedprefix.simulations.personas import MAX_ROWS, MAX_ROWS_PER_USER, too_many_rows

        if too_many_rows(users, examples or None):  # before any is written
            usage_error(
                f"--users {users} x --examples {examples or f'up to {MAX_ROWS_PER_USER}'}: the simulated "
                f"personas hold at most {MAX_ROWS:,} rows in all (your own data: --data)"
            )
    try:  # before Flower and Ray start: each node would fail on it, and the reason end up in a log
        from fedprefix.common.base_checks import check_base
        from fedprefix.coordinator.run_folder import check_run_folder

        check_base(config.base, config.node_positions)  # --set base=... may have replaced --base
        check_run_folder(config)  # before the personas' data is written into it
    except FedPrefixError as exc:
        fail(exc)
    from fedprefix.coordinator.run_folder import run_folder_lock

    try:  # held from before the personas' data is written to the run's end (simulate() holds it too);
        # your own data is only read before simulate() takes it, which writes nothing till then
        folder = contextlib.ExitStack()
        if personas:
            folder.enter_context(run_folder_lock(Path(config.run_dir)))
    except FedPrefixError as exc:
        fail(exc)
    with folder:
        users, data = _federation_data(config, users, examples, Path(out), err_console if as_json else console)
        config = _checked({**settings, "num_users": users, "data": data})
        try:
            recipe = f", {config.personal_recipe}" if config.mode == "shared+personal" else ""
            secure = ", last round under secure aggregation" if config.secure_last_round else ""
            how = f"{config.mode}{recipe}{secure}"
            title = f"simulating {users} users x {config.num_rounds} rounds on {config.base} ({how})"
            # Rounds as they end; with --json on stderr, so stdout stays JSON.
            with round_progress(err_console if as_json else console, config.num_rounds, title) as on_round:
                records = run_simulation(config, on_round=on_round)
        except (FedPrefixError, RuntimeError) as exc:
            fail(exc)
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in records], indent=2))
        return
    from fedprefix.coordinator.views import rounds_table

    console.print(rounds_table(records, latest=50))  # each round was printed as it ended
    console.print(f"run folder: {out}", markup=False)


@app.command("flower-app")
def flower_app(
    folder: Path = typer.Argument(..., help="Folder for the app's pyproject.toml (made if missing)."),
):
    """Write a Flower app folder for the Deployment Engine, where fedprefix is installed as a package.

    A checkout's own pyproject.toml is one already (flwr run . ...).

    Its settings are every run setting at its default; override them per run with --run-config.

    Example: fedprefix flower-app lab-app && flwr run lab-app lab --run-config "num-users=2" --stream
    """
    from fedprefix.common.config import FederationConfig
    from fedprefix.coordinator.simulate import write_app

    if (folder / "pyproject.toml").exists() or (folder.exists() and not folder.is_dir()):
        fail(FileExistsError(f"{folder / 'pyproject.toml'} exists already: name a new or another folder"))
    try:
        write_app(folder, FederationConfig())
    except OSError as exc:
        fail(exc)
    console.print(f"wrote {folder / 'pyproject.toml'}: flwr run {folder} FEDERATION --run-config ...", markup=False)


def _checked(values: dict):
    """`values` as a FederationConfig, or the CLI's one-line error naming the bad setting."""
    from fedprefix.common.config import FederationConfig
    from pydantic import ValidationError

    try:
        return FederationConfig.model_validate(values)
    except ValidationError as exc:  # a value no option's own check sees: a usage error too (exit 2)
        field, message = first_error(exc, "config")
        if message == "Extra inputs are not permitted":  # a --set of a name no setting has, said as typed
            dashed = field.replace("_", "-")
            known = [name.replace("_", "-") for name in FederationConfig.model_fields]
            usage_error(f"--set {dashed}: no such setting{did_you_mean(dashed, known)}")
        usage_error(f"setting {field}: {message}")


def _federation_data(config, users: int, examples: int, out: Path, note: Console) -> tuple[int, str]:
    """(users, data): simulated personas written beside the run, or the given data read and checked."""
    if config.data == "personas":
        from fedprefix.coordinator.run_folder import claim_run_folder
        from fedprefix.simulations.personas import write_federation_data

        claim_run_folder(config)  # marked a run's before the data goes in: a rerun may use it
        return users, str(write_federation_data(out / "data", users, examples or None))
    from fedprefix.client.partition import partition_users, read_users, user_split

    try:
        kept = partition_users(config.data, config.user_field, config.min_rows)
        available, dropped = len(kept), len(read_users(config.data, config.user_field)) - len(kept)
        for user in kept[: users or None]:  # each node splits its rows: a user it cannot split fails here, not there
            user_split(config.data, user, config.user_field, config.min_rows, config.eval_fraction)
    except FedPrefixError as exc:
        fail(exc)
    if dropped:
        note.print(
            f"{dropped} users of {config.data} have fewer than --min-rows {config.min_rows} rows: left out",
            markup=False,
        )
    if users > available:
        fail(FedPrefixError(f"--users {users}, but the data {config.data} holds {available} users"))
    return users or available, config.data


@app.command("runs")
def runs_command(
    runs: str = typer.Option("runs", "--runs", help="Folder holding run folders.", callback=non_empty_path),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List federated runs: id, mode, base, users, rounds done, last losses, status.

    Example: fedprefix runs --runs runs
    """
    from fedprefix.coordinator.records import RUN_FILE
    from fedprefix.coordinator.runs import list_runs

    try:
        summaries = list_runs(runs)
    except FedPrefixError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps([s.model_dump() for s in summaries], indent=2))
        return
    table = numbers_table(f"runs in {escape(runs)}")
    for column in ("id", "status", "mode", "base", "users", "rounds", "base loss", "shared", "personal"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            *(plain(text) for text in (s.id, s.status, s.mode, s.base)),  # from run folders: no markup, no escapes
            str(s.users),
            f"{s.rounds_done}/{s.rounds_planned}",
            fmt_num(s.last_eval_loss_base),
            fmt_num(s.last_eval_loss_shared),
            fmt_num(s.last_eval_loss_personal),
        )
    console.print(table)
    if not summaries and (nested := sorted(p.parent for p in Path(runs).glob(f"*/*/{RUN_FILE}"))):
        err_console.print(  # e.g. --runs pointing one level above a folder of runs
            f"no run folders in {escape(runs)}, but one level down in {escape(str(nested[0].parent))}: "
            f"fedprefix runs --runs {escape(str(nested[0].parent))}",
            highlight=False,
        )
    for s in summaries:
        for problem in s.problems:
            warn(f"{s.id}: {problem}")


@app.command("show")
def show_command(
    run: str = typer.Argument(..., help="Run id (folder name under --runs) or a path to a run folder."),
    runs: str = typer.Option("runs", "--runs", help="Folder holding run folders.", callback=non_empty_path),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    last: int = typer.Option(50, "--last", min=0, help="Rounds in the table: the latest N (0: all)."),
) -> None:
    """One run: the per-round table, the personalization gain and a sparkline of the losses.

    Example: fedprefix show demo --runs runs
    """
    from fedprefix.coordinator.records import read_run
    from fedprefix.coordinator.runs import load_run, with_writer_checked
    from fedprefix.coordinator.views import ASCII_SPARKS, SPARKS, rounds_table, sparkline

    try:
        # a run id under --runs first: a same-named folder in the current one must not stand in for it
        by_id = Path(run).name == run and (Path(runs) / run).is_dir()
        if not by_id and Path(run).is_dir():
            info, records, problems = with_writer_checked(*read_run(run))
        else:
            info, records, problems = load_run(runs, run)
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
        warn(problem)
    console.print(
        f"[bold]{plain(run)}[/bold]: "
        + plain(
            f"{info.status}, mode {mode_label(info.config)}, base {info.base}, "
            f"{info.config.get('num_users')} users, {len(records)}/{info.config.get('num_rounds')} rounds"
        )
    )
    console.print(rounds_table(records, latest=last))
    levels = ASCII_SPARKS if console.options.ascii_only else SPARKS  # as the table's borders do
    for name in ("eval_loss_base", "eval_loss_shared", "eval_loss_personal", "train_loss"):
        values = [getattr(r, name) for r in records]
        console.print(
            f"{name:20s} {sparkline(values, levels=levels)}  {fmt_num(values[0] if values else None)} -> "
            f"{fmt_num(values[-1] if values else None)}"
        )
    if records and (gain := records[-1].personalization_gain) is not None:
        last = records[-1]
        shared_gain = last.eval_loss_base - (last.eval_loss_shared or last.eval_loss_base)
        share = f" ({gain / last.eval_loss_base:.1%})" if last.eval_loss_base > 0 else ""  # a loss of 0: no share
        console.print(
            f"personalization gain (base - personal loss): {gain:.3f}{share}; "
            f"from the shared prefix alone: {shared_gain:.3f}"
        )


@app.command("dashboard")
def dashboard_command(
    runs: str = typer.Option("runs", "--runs", help="Folder holding run folders.", callback=non_empty_path),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8050, "--port", min=1, max=65535, help="Port to listen on."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help=ALLOWED_HOST_HELP),
    ssl_certfile: str = typer.Option(None, "--ssl-certfile", help=CERT_HELP, callback=non_empty_path),
    ssl_keyfile: str = typer.Option(None, "--ssl-keyfile", help=KEY_HELP, callback=non_empty_path),
) -> None:
    """A read-only web dashboard of the runs (works offline; updates while a run goes on).

    Example: fedprefix dashboard --runs runs --port 8050, then open http://127.0.0.1:8050
    """
    from fedprefix.common.http_guards import uvicorn_server
    from fedprefix.coordinator.dashboard.app import create_dashboard
    from fedprefix.coordinator.runs import require_runs_folder

    try:
        require_runs_folder(runs)
    except FedPrefixError as exc:
        fail(exc)
    hosts = http_exposure(host, port, allowed_host, ssl_certfile, ssl_keyfile)
    console.print(f"dashboard of {runs} on {'https' if ssl_certfile else 'http'}://{host}:{port}", markup=False)
    server = uvicorn_server(create_dashboard(runs, allowed_hosts=hosts), host, port, ssl_certfile, ssl_keyfile)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the signal it stopped on again once it has shut down
        pass
