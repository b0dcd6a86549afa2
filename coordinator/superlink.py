"""A SuperLink of our own on a free loopback port, and the environment of the Flower processes a
simulation starts (simulate.py runs the federation on them; the Deployment Engine test starts
SuperNodes on one too)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
from fedprefix.common.files import open_private_append

from .processes import OwnedProcesses, owned_processes, ray_token_env
from .run_folder import SimulationError

SUPERLINK_NAME = "fedprefix-sim"
STARTUP_TIMEOUT_S = 60.0
RAY_TMPDIR_MAX = 36  # + /ray/session_<time>_<pid>/sockets/plasma_store: within AF_UNIX's 107
PORT_TRIES = 3  # a SuperLink whose free port another program took meanwhile starts again on another

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
