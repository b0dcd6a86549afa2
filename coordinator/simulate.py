"""Run a federation on this machine through `flwr run`, without knowing Flower.

`fedprefix simulate` calls `simulate()`, which does what a Flower user would do by hand:
1. write a minimal Flower app folder whose pyproject names fedprefix's ClientApp and
   ServerApp and holds the run settings (no code is copied: nodes import the installed
   fedprefix, and FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 stops Flower from
   installing it again);
2. start its own local SuperLink in simulation mode on a free loopback port, with its
   own FLWR_HOME;
3. `flwr run APP fedprefix-sim --federation-config "num-supernodes=N ..."`, and while it
   runs, read RUN_DIR/rounds.jsonl every half second: each new round goes to `on_round`
   as it ends, and a run that records "failed" ends the wait at once;
4. stop every process it started, on a normal end, on errors, on Ctrl-C and on SIGTERM
   (which, while simulate() runs in the main thread, raises KeyboardInterrupt like Ctrl-C).

coordinator/superlink.py starts the SuperLink and sets the Flower processes' environment;
coordinator/processes.py says how every process is found and stopped.
The same apps run unchanged under the Deployment Engine (README).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedprefix.common.config import FederationConfig
from fedprefix.common.files import open_private_append
from fedprefix.common.resources import available_memory, usable_cores

from .node_sizing import NodePlan, plan_for_machine, plan_nodes
from .processes import OwnedProcesses, owned_processes
from .records import (
    RUN_FILE,
    RoundRecord,
    RunFolderError,
    clear_run_outputs,
    end_unfinished,
    read_run,
)
from .run_folder import SimulationError, claim_run_folder, fresh_node_stores, run_folder_lock
from .superlink import SUPERLINK_NAME, check_python_path, flower_bin, flower_env, local_superlink
from .views import printable

logger = logging.getLogger(__name__)

CLIENT_APP = "fedprefix.client.app:app"  # the ClientApp every simulated node runs
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # a write failing for want of room
POLL_S = 0.5  # how often a running simulation reads its round records


def write_app(folder: Path, config: FederationConfig, clientapp: str = CLIENT_APP) -> Path:
    """A Flower app folder: only a pyproject.toml naming fedprefix's apps and the settings."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = "\n".join(f"{key} = {json.dumps(value)}" for key, value in config.to_run_config().items())
    (folder / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedprefix-simulation"
version = "1.0.0"
description = "fedprefix's ClientApp and ServerApp, as `fedprefix simulate` runs them"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedprefix"

[tool.flwr.app.components]
serverapp = "fedprefix.coordinator.app:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{settings}
"""
    )
    return folder


class RoundWatcher:
    """Reads a run folder while it is written: `poll()` hands each new round to `on_round`
    once, in order, and returns the run's status (None before run.json exists)."""

    def __init__(self, run_dir: Path, on_round: Callable[[RoundRecord], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.on_round = on_round
        self.last_round = 0

    def poll(self) -> str | None:
        if not (self.run_dir / RUN_FILE).is_file():  # simulate() removed the last run's; this run's comes
            return None
        try:
            info, rounds, _ = read_run(self.run_dir)
        except (RunFolderError, OSError):
            return None
        for record in rounds:
            if record.round > self.last_round:
                self.last_round = record.round
                if self.on_round is not None:
                    self.on_round(record)
        return info.status


FINISH_GRACE_S = 1.0  # Flower's last log lines reach flower.log within ~0.5 s of the run's end


def wait_for_run(process: subprocess.Popen, watcher: RoundWatcher, owned: OwnedProcesses | None = None) -> str | None:
    """Wait until `flwr run` ends or the run records "failed", polling the rounds; returns the run's status.

    Once the run records "finished" (its ServerApp is done, its records whole), `flwr run` gets
    FINISH_GRACE_S more, for Flower's last log lines; the caller then stops every process. Flower
    would go on to wait for every node task still running (one that stalled past the round
    timeout held the ended run for minutes) and shut Ray down in order (~4 s a run)."""
    finished_at = None
    while True:
        ended = process.poll() is not None
        status = watcher.poll()  # after poll(): once it ended, every round is on disk
        if ended or status == "failed":
            return status
        if status == "finished":
            finished_at = finished_at or time.monotonic()
            if time.monotonic() - finished_at > FINISH_GRACE_S:
                return status
        if owned is not None:
            owned.remember()
        time.sleep(POLL_S)


def simulate(
    config: FederationConfig,
    cpus_per_client: int | None = None,
    verbose: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    clientapp: str = CLIENT_APP,
) -> list[RoundRecord]:
    """Run `config` with `config.num_users` simulated nodes; returns the rounds recorded.

    `cpus_per_client`: Ray CPUs (and torch threads) per node; None: the cores shared among the
    nodes of a round that this machine's memory holds (node_sizing.py).
    `on_round(record)` is called once per round, as each round ends. `clientapp` names
    another ClientApp for the nodes ("module:attribute"; experiments wrap the real one). Every process started
    here is stopped before this returns or raises (also on Ctrl-C and SIGTERM).
    """
    from fedprefix.common.base_checks import check_base, parameter_count  # torch: only once a run starts

    check_python_path(sys.executable)
    # before the run's folder is touched: a base each node would fail to load stops the run here
    check_base(config.base, config.node_positions)
    cores = usable_cores()
    if cpus_per_client is None:
        plan = plan_for_machine(config, cores, parameter_count(config.base), available_memory())
    else:
        plan = plan_nodes(config, cores, cpus=cpus_per_client)
    claim_run_folder(config)
    with run_folder_lock(Path(config.run_dir)):  # a second run into it would empty it under this one
        if not config.store_root:  # the run's own stores: a rerun into the same folder starts afresh
            fresh_node_stores(Path(config.node_store_root))
        config = config.model_copy(
            update={
                "run_dir": str(Path(config.run_dir).resolve()),
                "store_root": str(Path(config.node_store_root).resolve()),
                **({"audit_dir": str(Path(config.audit_dir).resolve())} if config.audit_dir else {}),
                # node processes may not share this process's working folder
                **({"data": str(Path(config.data).resolve())} if config.data else {}),
            }
        )
        run_dir = Path(config.run_dir)  # made by claim_run_folder
        clear_run_outputs(run_dir)
        log_file = run_dir / "flower.log"
        log_file.unlink(missing_ok=True)  # appended to while it runs: an earlier run's dead node is not this run's
        try:
            returncode = _run_federation(config, clientapp, verbose, plan, log_file, on_round)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, a hangup: every process is stopped; the record says so
            end_unfinished(run_dir, "interrupted", "stopped (Ctrl-C, SIGTERM or a hangup)")
            raise
        except BaseException as exc:
            try:
                end_unfinished(run_dir, "failed", f"{type(exc).__name__}: {exc}")
            except OSError as unrecorded:  # a full disk: the run's own error is the one to tell
                logger.warning("could not record the run's end in %s: %s", run_dir, unrecorded)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL and exc.filename is None:
                # a write that names no file (a log line, a round record): say where it was writing
                where = f"its run folder {run_dir} or the temp folder {tempfile.gettempdir()}"
                raise SimulationError(f"the run failed writing to {where}: {exc.strerror or exc}") from exc
            raise
        if not (run_dir / RUN_FILE).is_file():
            problem = f"the federation did not start (flwr run exit code {returncode}){last_error(log_file)}"
            raise SimulationError(f"{problem}; see {log_file}")
        died = died_node_note(log_file)
        if died:  # the run may still have finished: its other nodes went on
            logger.warning(died)
        info, rounds, problems = read_run(run_dir)
        if info.status == "running":  # the ServerApp's process ended without writing its end (killed)
            unrecorded = f"the ServerApp ended without recording its end (flwr exit code {returncode})"
            unrecorded += last_error(log_file)
            end_unfinished(run_dir, "failed", unrecorded)
            info, rounds, problems = read_run(run_dir)
        # the ServerApp's end: also where no reply was accepted (records.nothing_accepted)
        if info.status != "finished":
            reason = f"the federation {info.status}: {info.error or 'no reason recorded'}; see {log_file}"
            if died:  # the record says it too
                end_unfinished(run_dir, info.status, "; ".join(filter(None, (info.error, died))), ended=(info.status,))
            raise SimulationError("; ".join(filter(None, (reason, died))))
        return rounds


_ERROR_LINE = re.compile(r"\b[A-Z]\w*(?:Error|Exception): \S.*")  # a Python traceback's last line
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def last_error(log_file: Path) -> str:
    """', last error in flower.log: <ItsError: message>' naming the last exception a process of the
    run logged (where Flower or Ray failed before the run could record why), or ''."""
    try:
        with open(log_file, "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - 65536))
            lines = log.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if found := _ERROR_LINE.search(_ANSI.sub("", line)):
            return f", last error in flower.log: {printable(found.group().rstrip(' │|'))[:300]}"
    return ""


def died_node_note(log_file: Path) -> str:
    """A note where Flower's log shows that a node's process died (Ray's ActorDiedError), which
    the round records show only as nodes that failed or never replied; Ray names the kernel's OOM
    killer first among the causes. '' where it shows none."""
    try:
        with open(log_file, "rb") as log:
            died = any(b"ActorDiedError" in line for line in log)
    except OSError:
        return ""
    if not died:
        return ""
    return (
        f"a node's process died during the run (Ray's ActorDiedError in {log_file}); the kernel kills one "
        "where memory runs short: free some, or train fewer users per round (--users-per-round)"
    )


def _run_federation(config, clientapp, verbose, plan: NodePlan, log_file, on_round) -> int | None:
    """flwr run on a SuperLink of our own until the run ends; its exit code (processes all stopped)."""
    run_dir = Path(config.run_dir)
    with tempfile.TemporaryDirectory(prefix="fedprefix-sim-") as tmp, owned_processes(temp_folder=tmp) as owned:
        tmp = Path(tmp)
        app = write_app(tmp / "app", config, clientapp)
        flwr_home = tmp / "flwr-home"
        with local_superlink(flwr_home, log_file, owned=owned):
            federation = plan.federation_config(config)
            command = [
                flower_bin("flwr"),
                "run",
                str(app),
                SUPERLINK_NAME,
                "--federation-config",
                federation,
                "--stream",
            ]
            with open_private_append(log_file) as log:
                flwr_run = owned.popen(
                    command, env=flower_env(flwr_home), stdout=None if verbose else log, stderr=subprocess.STDOUT
                )
            if wait_for_run(flwr_run, RoundWatcher(run_dir, on_round), owned) == "finished":
                owned.stop(grace=0)  # nothing of the run is left to write: SIGKILL, no orderly shutdown
            return flwr_run.returncode
