"""Run a federation on this machine through `flwr run`, without knowing Flower.

`fedprefix simulate` calls `simulate()`, which does what a Flower user would do by hand:
1. write a minimal Flower app folder whose pyproject names fedprefix's ClientApp and
   ServerApp and holds the run settings (no code is copied: nodes import the installed
   fedprefix, and FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 stops Flower from
   installing it again);
2. start its own local SuperLink in simulation mode on a free loopback port, with its
   own FLWR_HOME, and remember the process;
3. `flwr run APP fedprefix-sim --federation-config "num-supernodes=N ..."`;
4. stop the SuperLink it started (its whole process group), also on errors.
The same apps run unchanged under the Deployment Engine (README).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from fedprefix.common.config import FederationConfig
from fedprefix.common.errors import FedPrefixError

from .records import RUN_FILE, RoundRecord, read_run

SUPERLINK_NAME = "fedprefix-sim"
STARTUP_TIMEOUT_S = 60.0


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


@contextmanager
def local_superlink(flwr_home: Path, log_file: Path, simulation: bool = True):
    """A SuperLink of our own on a free loopback port (yields the port); stopped on exit.

    `simulation=False` starts a Deployment Engine SuperLink that real SuperNodes join.
    """
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
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=flower_env(flwr_home)
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(port):
            if process.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
            if time.monotonic() > deadline:
                raise SimulationError(
                    f"flower-superlink did not start within {STARTUP_TIMEOUT_S:.0f} s; see {log_file}"
                )
            time.sleep(0.2)
        yield port
    finally:
        stop_process_group(process)


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


def simulate(config: FederationConfig, cpus_per_client: float = 1.0, verbose: bool = False) -> list[RoundRecord]:
    """Run `config` with `config.num_users` simulated nodes; returns the rounds recorded."""
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
    with tempfile.TemporaryDirectory(prefix="fedprefix-sim-") as tmp:
        tmp = Path(tmp)
        app = write_app(tmp / "app", config)
        flwr_home = tmp / "flwr-home"
        log_file = run_dir / "flower.log"
        with local_superlink(flwr_home, log_file):
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
                done = subprocess.run(
                    command,
                    env=flower_env(flwr_home),
                    stdout=None if verbose else log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
    if not (run_dir / RUN_FILE).is_file():
        raise SimulationError(f"the federation did not start (flwr run exit code {done.returncode}); see {log_file}")
    info, rounds, problems = read_run(run_dir)
    if info.status != "finished":
        raise SimulationError(f"the federation {info.status}: {info.error or 'no reason recorded'}; see {log_file}")
    return rounds
