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

coordinator/processes.py says how every process is found and stopped.
The same apps run unchanged under the Deployment Engine (README).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
from fedprefix.common.config import FederationConfig
from fedprefix.common.files import open_private_append
from fedprefix.common.resources import available_memory, usable_cores

from .node_sizing import NodePlan, plan_for_machine, plan_nodes
from .processes import OwnedProcesses, owned_processes, ray_token_env
from .records import (
    RUN_FILE,
    RoundRecord,
    RunFolderError,
    clear_run_outputs,
    end_unfinished,
    read_run,
)
from .run_folder import SimulationError, claim_run_folder, fresh_node_stores, run_folder_lock
from .views import printable

logger = logging.getLogger(__name__)

SUPERLINK_NAME = "fedprefix-sim"
CLIENT_APP = "fedprefix.client.app:app"  # the ClientApp every simulated node runs
STARTUP_TIMEOUT_S = 60.0
RAY_TMPDIR_MAX = 36  # + /ray/session_<time>_<pid>/sockets/plasma_store: within AF_UNIX's 107
PORT_TRIES = 3  # a SuperLink whose free port another program took meanwhile starts again on another
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # a write failing for want of room
POLL_S = 0.5  # how often a running simulation reads its round records


SHELL_SPECIAL = frozenset(" \t\n$`\"'\\;&|<>()*?[]#~!{}")


def check_python_path(python: str) -> None:
    """SimulationError where Ray cannot start its workers from `python`: Ray (2.55) runs a worker
    with a runtime environment, as Flower's always has, through `bash -c` with the interpreter's
    path unquoted, so a space in it failed every node after minutes, saying only that worker
    startup failed."""
    if found := sorted(SHELL_SPECIAL & set(python)):
        raise SimulationError(
            f"this Python's path {python!r} holds {', '.join(map(repr, found))}, which Ray's workers cannot "
            "start from (it runs them through a shell unquoted): put the checkout or virtual environment "
            "in a folder whose path has no spaces or shell characters"
        )


def flower_bin(name: str) -> str:
    """A console script installed beside this Python (the venv's bin folder)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# --- The SuperLink and the run ------------------------------------------------------------


@contextmanager
def local_superlink(flwr_home: Path, log_file: Path, simulation: bool = True, owned: OwnedProcesses | None = None):
    """A SuperLink of our own on a free loopback port (yields the port); stopped on exit.

    `simulation=False` starts a Deployment Engine SuperLink that real SuperNodes join.
    Everything it starts (SuperExec, flwr-simulation, Ray, ServerApp processes) is stopped
    with it; given `owned`, it is started as one of those and `owned` stops it instead.
    """
    if owned is None:
        with owned_processes() as mine, local_superlink(flwr_home, log_file, simulation, mine) as port:
            yield port
        return
    flwr_home.mkdir(parents=True, exist_ok=True)
    for _ in range(PORT_TRIES):
        port = free_port()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{SUPERLINK_NAME}"\n\n'
            f'[superlink.{SUPERLINK_NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        command = [
            flower_bin("flower-superlink"),
            "--insecure",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ] + (["--simulation"] if simulation else [])
        with open_private_append(log_file) as log:
            process = owned.popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=flower_env(flwr_home)
            )
        if _serving(process, port, log_file):
            yield port
            return
    raise SimulationError(f"flower-superlink found its port taken {PORT_TRIES} times; see {log_file}")


def _serving(process: subprocess.Popen, port: int, log_file: Path) -> bool:
    """Wait until the SuperLink `process` serves on `port`: True; False where another program
    took the port between free_port() and the SuperLink's bind (a run of another user's, whose
    SuperLink answered the health check: this run's app ran there, as that user)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            if _port_taken(port):
                return False
            raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        if _healthy(port) and _listens(process, port):
            return True
        if time.monotonic() > deadline:
            raise SimulationError(f"flower-superlink did not start within {STARTUP_TIMEOUT_S:.0f} s; see {log_file}")
        time.sleep(0.2)


def _port_taken(port: int) -> bool:
    """Whether another program holds loopback `port` now (the SuperLink that exited could not bind it)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _listens(process: subprocess.Popen, port: int) -> bool:
    """Whether `process` or a descendant listens on loopback `port` (True where the OS does not tell)."""
    try:
        root = psutil.Process(process.pid)
        for each in (root, *root.children(recursive=True)):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in each.net_connections("tcp")):
                return True
    except psutil.AccessDenied:
        return True
    except psutil.Error:  # ended meanwhile: the caller's poll() tells
        pass
    return False


def _healthy(port: int) -> bool:
    try:
        # trust_env off: a proxy setting (HTTP_PROXY) sent this loopback request to the proxy
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5, trust_env=False).is_success
    except httpx.HTTPError:
        return False


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session and everything it spawned."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def flower_env(flwr_home: Path) -> dict:
    """The environment of the Flower processes simulate() starts, and through them of Ray's,
    whose cluster requires a token of its own (ray_token_env); `flwr_home`'s folder is the run's
    temp folder."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # else Flower reinstalls torch & co per run
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    # Every connection of these processes is on loopback (SuperLink, Ray, nodes), while a proxy
    # setting took Flower's own gRPC to the proxy (HTTP_PROXY), or failed it before any request
    # (ALL_PROXY=socks5://...: httpx wants a package for SOCKS even for hosts NO_PROXY excludes).
    for name in [name for name in env if name.lower().endswith("_proxy") and name.lower() != "no_proxy"]:
        del env[name]
    # Their output goes to flower.log, in UTF-8 whatever the user's terminal takes: Flower prints
    # box-drawing characters, which failed `flwr run` under PYTHONIOENCODING=ascii or a Latin-1 locale.
    env["PYTHONIOENCODING"] = "utf-8"
    # a hub id's base was downloaded before the run (check_base): nodes read it from the cache,
    # without the network (which, with no proxy, each node would wait on before using the cache)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Ray's session folder (logs that quote nodes' warnings, 0644 by default) in the run's own temp
    # folder, removed with it: in /tmp/ray every run left one for good. Not where Ray's socket paths
    # (the folder + 68 characters) would pass the OS's 107, nor where the owner chose another.
    ray_tmp = str(flwr_home.parent)
    if "RAY_TMPDIR" not in env and len(ray_tmp) <= RAY_TMPDIR_MAX:
        env["RAY_TMPDIR"] = ray_tmp
    return env | ray_token_env(env)


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
