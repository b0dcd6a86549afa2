"""Processes a simulation starts, and stopping every one of them, however the caller ends.

Stopping the SuperLink alone is not enough: the SuperExec it starts runs in a session of
its own and leaves flwr-simulation behind, and with it the whole Ray cluster (gcs_server,
raylet, dashboard, ClientAppActor workers) at full CPU. So every process started here
carries FEDPREFIX_SIM_TAG=<uuid> in its environment, which all their descendants inherit;
`OwnedProcesses.stop()` finds them by that tag (and as descendants of what we started,
also seen while the run went on), sends SIGTERM, waits a few seconds, then SIGKILLs the
rest. (Not a child subreaper as well: orphans found by tag need no re-parenting, and
processes a caller starts meanwhile would stay our zombies once their parents die.)
While an `owned_processes()` block runs in the main thread, SIGTERM and SIGHUP raise
KeyboardInterrupt like Ctrl-C, so the same cleanup runs. A process killed outright (SIGKILL,
the OOM killer) runs no cleanup: for that, a watchdog started with the block (`python -m
fedprefix.coordinator.processes PID TAG`, in a session of its own) stops every process of the
tag once PID has ended. Before it, the SuperLink and SuperExec ran on for good.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import psutil
from fedprefix.common.signals import signals_deferred, stop_signals_as_interrupt

logger = logging.getLogger(__name__)

TAG_VAR = "FEDPREFIX_SIM_TAG"  # in the environment of every process an OwnedProcesses starts
STOP_GRACE_S = 3.0  # between SIGTERM and SIGKILL (Ray's daemons often need the SIGKILL)


def ray_token_env(env: Mapping[str, str]) -> dict[str, str]:
    """What makes a Ray cluster of ours require a token of its own (Ray >= 2.52's
    RAY_AUTH_MODE=token), held only in its processes' environment: Ray's control plane listens
    on every interface and runs whatever anyone who reaches it submits, beside users' rows, keys
    and prefixes. Nothing where RAY_AUTH_MODE or RAY_ADDRESS is set: the owner's, or a cluster's."""
    if "RAY_AUTH_MODE" in env or "RAY_ADDRESS" in env:
        return {}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}


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
    """SIGTERM, up to `grace` seconds to end, then SIGKILL (grace 0: SIGKILL at once); returns
    those still alive after that."""
    remaining = processes
    if grace > 0:
        send(processes, signal.SIGTERM)
        remaining = wait_gone(processes, grace)
        if remaining:
            logger.debug("SIGKILL to %s, alive %.0f s after SIGTERM", _describe(remaining), grace)
    send(remaining, signal.SIGKILL)
    return wait_gone(remaining, STOP_GRACE_S)


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `processes` still alive after up to `timeout` s. A zombie counts as gone (psutil's
    wait_procs waited, checking one process after another, for killed ones to be reaped too)."""
    deadline = time.monotonic() + timeout
    remaining = alive(processes)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.02)
        remaining = alive(remaining)
    return remaining


def _describe(processes: Iterable[psutil.Process]) -> str:
    names = []
    for process in processes:
        try:
            names.append(f"{process.pid} ({process.name()})")
        except psutil.Error:
            names.append(str(process.pid))
    return ", ".join(names)


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


WATCH_S = 1.0  # how often the watchdog looks for its parent


def watch(parent: psutil.Process | None, tag: str, temp_folder: str | None = None) -> None:
    """Wait for `parent` to end, then stop every process of `tag` and remove their `temp_folder`
    (the watchdog's own work)."""
    while parent is not None:
        try:
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.Error:  # reaped between the two looks
            break
        time.sleep(WATCH_S)
    OwnedProcesses(tag).stop()
    if temp_folder:
        shutil.rmtree(temp_folder, ignore_errors=True)


@contextmanager
def owned_processes(temp_folder: str | os.PathLike | None = None):
    """An OwnedProcesses whose processes are all stopped on leaving, however it is left (a
    watchdog stops them where this process is killed outright, and removes `temp_folder`, theirs,
    which the caller removes otherwise: Ray's session logs are in a simulation's)."""
    owned = OwnedProcesses()
    command = [sys.executable, "-m", __name__, str(os.getpid()), owned.tag]
    command += [str(temp_folder)] if temp_folder else []
    streams = {name: subprocess.DEVNULL for name in ("stdin", "stdout", "stderr")}
    owned.popen(command, env=dict(os.environ), start_new_session=True, **streams)
    with stop_signals_as_interrupt():
        try:
            yield owned
        finally:
            with signals_deferred() as received:
                survivors = owned.stop()
            if survivors:
                logger.warning("could not stop %s (%s=%s)", _describe(survivors), TAG_VAR, owned.tag)
            if received and sys.exc_info()[1] is None:  # interrupted while cleaning up after a normal end
                raise KeyboardInterrupt(f"signal {received[0]} during cleanup")


if __name__ == "__main__":  # the watchdog: PID TAG [TEMP_FOLDER]
    try:
        watched = psutil.Process(int(sys.argv[1]))
    except psutil.NoSuchProcess:
        watched = None
    watch(watched, sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
