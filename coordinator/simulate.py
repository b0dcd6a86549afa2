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

Stopping the SuperLink alone is not enough: the SuperExec it starts runs in a session of
its own and leaves flwr-simulation behind, and with it the whole Ray cluster (gcs_server,
raylet, dashboard, ClientAppActor workers) at full CPU. So every process started here
carries FEDPREFIX_SIM_TAG=<uuid> in its environment, which all their descendants inherit;
`OwnedProcesses.stop()` finds them by that tag (and as descendants of what we started,
also seen while the run went on), sends SIGTERM, waits a few seconds, then SIGKILLs the
rest. (Not a child subreaper as well: orphans found by tag need no re-parenting, and
processes a caller starts meanwhile would stay our zombies once their parents die.)
The same apps run unchanged under the Deployment Engine (README).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
from fedprefix.common.config import FederationConfig
from fedprefix.common.errors import FedPrefixError

from .records import RUN_FILE, RoundRecord, RunFolderError, read_run

logger = logging.getLogger(__name__)

SUPERLINK_NAME = "fedprefix-sim"
STARTUP_TIMEOUT_S = 60.0
TAG_VAR = "FEDPREFIX_SIM_TAG"  # in the environment of every process simulate() starts
STOP_GRACE_S = 3.0  # between SIGTERM and SIGKILL (Ray's daemons often need the SIGKILL)
POLL_S = 0.5  # how often a running simulation reads its round records
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SimulationError(FedPrefixError):
    """A simulated federation could not start or did not finish."""


def flower_bin(name: str) -> str:
    """A console script installed beside this Python (the venv's bin folder)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_app(folder: Path, config: FederationConfig) -> Path:
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
clientapp = "fedprefix.client.app:app"

[tool.flwr.app.config]
{settings}
"""
    )
    return folder


# --- Processes we start, and stopping every one of them ---------------------------------


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Running processes whose environment holds TAG_VAR=tag (unreadable ones are skipped)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(TAG_VAR) == tag:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def descendants(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The roots that still run and all their descendants."""
    found = []
    for root in roots:
        try:
            found += [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes (by pid and start time, so a reused pid is not taken) not yet ended, zombies excluded."""
    result, pids = [], set()
    for process in processes:
        try:
            if process.pid in pids or not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pids.add(process.pid)
        result.append(process)
    return result


def send(processes: Iterable[psutil.Process], sig: int) -> None:
    for process in processes:
        try:
            process.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def terminate_then_kill(processes: list[psutil.Process], grace: float = STOP_GRACE_S) -> list[psutil.Process]:
    """SIGTERM, up to `grace` seconds to end, then SIGKILL; returns those still alive after that."""
    send(processes, signal.SIGTERM)
    _, remaining = psutil.wait_procs(processes, timeout=grace)
    if remaining:
        logger.debug("SIGKILL to %s, alive %.0f s after SIGTERM", _describe(remaining), grace)
    send(remaining, signal.SIGKILL)
    _, remaining = psutil.wait_procs(remaining, timeout=grace)
    return alive(remaining)


def _describe(processes: Iterable[psutil.Process]) -> str:
    names = []
    for process in processes:
        try:
            names.append(f"{process.pid} ({process.name()})")
        except psutil.Error:
            names.append(str(process.pid))
    return ", ".join(names)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt meanwhile, so cleanups run as on Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM off while a cleanup runs (main thread only); yields the list of
    those that came meanwhile, for the caller to act on once the cleanup is done."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class OwnedProcesses:
    """Every process one simulation starts, their descendants, and stopping all of them.

    `popen` starts a process with TAG_VAR=tag in its environment; `remember` notes the
    descendants seen meanwhile (called while waiting); `stop` ends every one of them.
    """

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex
        self.started: list[subprocess.Popen] = []
        self.seen: dict[int, psutil.Process] = {}

    def env(self, base: dict) -> dict:
        return {**base, TAG_VAR: self.tag}

    def popen(self, command: list[str], env: dict, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, env=self.env(env), **kwargs)
        self.started.append(process)
        self.remember()
        return process

    def _roots(self) -> list[psutil.Process]:
        roots = []
        for process in self.started:
            if process.poll() is None:
                try:
                    roots.append(psutil.Process(process.pid))
                except psutil.NoSuchProcess:
                    continue
        return roots

    def remember(self) -> None:
        for process in descendants(self._roots()):
            self.seen.setdefault(process.pid, process)

    def find(self) -> list[psutil.Process]:
        """Everything of ours still running: tagged, descendants of what we started, seen before."""
        return alive([*descendants(self._roots()), *tagged_processes(self.tag), *self.seen.values()])

    def stop(self, grace: float = STOP_GRACE_S, passes: int = 3) -> list[psutil.Process]:
        """Stop all of them (a few passes, for processes started during the first); returns survivors."""
        remaining: list[psutil.Process] = []
        for _ in range(passes):
            self.remember()
            remaining = self.find()
            if not remaining:
                break
            for process in remaining:
                self.seen.setdefault(process.pid, process)
            remaining = terminate_then_kill(remaining, grace)
        for process in self.started:
            process.poll()  # Popen notes the exit (and reaps it) where psutil did not
        return alive(self.find())


@contextmanager
def owned_processes():
    """An OwnedProcesses whose processes are all stopped on leaving, however it is left."""
    owned = OwnedProcesses()
    with sigterm_as_interrupt():
        try:
            yield owned
        finally:
            with signals_deferred() as received:
                survivors = owned.stop()
            if survivors:
                logger.warning("could not stop %s (%s=%s)", _describe(survivors), TAG_VAR, owned.tag)
            if received and sys.exc_info()[1] is None:  # interrupted while cleaning up after a normal end
                raise KeyboardInterrupt(f"signal {received[0]} during cleanup")


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
    port = free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
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
    with open(log_file, "ab") as log:
        process = owned.popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=flower_env(flwr_home)
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(port):
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        if time.monotonic() > deadline:
            raise SimulationError(f"flower-superlink did not start within {STARTUP_TIMEOUT_S:.0f} s; see {log_file}")
        time.sleep(0.2)
    yield port


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
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
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # else Flower reinstalls torch & co per run
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


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


def wait_for_run(process: subprocess.Popen, watcher: RoundWatcher, owned: OwnedProcesses | None = None) -> str | None:
    """Wait until `flwr run` ends or the run records "failed", polling the rounds; returns the run's status."""
    while True:
        ended = process.poll() is not None
        status = watcher.poll()  # after poll(): once it ended, every round is on disk
        if ended or status == "failed":
            return status
        if owned is not None:
            owned.remember()
        time.sleep(POLL_S)


def simulate(
    config: FederationConfig,
    cpus_per_client: float = 1.0,
    verbose: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Run `config` with `config.num_users` simulated nodes; returns the rounds recorded.

    `on_round(record)` is called once per round, as each round ends. Every process started
    here is stopped before this returns or raises (also on Ctrl-C and SIGTERM).
    """
    config = config.model_copy(
        update={
            "run_dir": str(Path(config.run_dir).resolve()),
            "store_root": str(Path(config.store_root).resolve()),
            **({"audit_dir": str(Path(config.audit_dir).resolve())} if config.audit_dir else {}),
        }
    )
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).unlink(missing_ok=True)
    log_file = run_dir / "flower.log"
    with tempfile.TemporaryDirectory(prefix="fedprefix-sim-") as tmp, owned_processes() as owned:
        tmp = Path(tmp)
        app = write_app(tmp / "app", config)
        flwr_home = tmp / "flwr-home"
        with local_superlink(flwr_home, log_file, owned=owned):
            cpus = int(cpus_per_client) if float(cpus_per_client).is_integer() else cpus_per_client
            federation = f"num-supernodes={config.num_users} client-resources-num-cpus={cpus}"
            command = [
                flower_bin("flwr"),
                "run",
                str(app),
                SUPERLINK_NAME,
                "--federation-config",
                federation,
                "--stream",
            ]
            with open(log_file, "ab") as log:
                flwr_run = owned.popen(
                    command, env=flower_env(flwr_home), stdout=None if verbose else log, stderr=subprocess.STDOUT
                )
            wait_for_run(flwr_run, RoundWatcher(run_dir, on_round), owned)
            returncode = flwr_run.returncode
    if not (run_dir / RUN_FILE).is_file():
        raise SimulationError(f"the federation did not start (flwr run exit code {returncode}); see {log_file}")
    info, rounds, problems = read_run(run_dir)
    if info.status != "finished":
        raise SimulationError(f"the federation {info.status}: {info.error or 'no reason recorded'}; see {log_file}")
    return rounds
