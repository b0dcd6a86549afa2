"""A run's folder: checked, claimed and locked before a run writes into it, and the node
stores a simulation keeps there (simulate.py runs the federation)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedprefix.common.config import FederationConfig
from fedprefix.common.errors import FedPrefixError
from filelock import FileLock, Timeout

from .records import RunFolderError, read_info
from .runs import is_run_id

SIMULATION_MARK = ".fedprefix-simulation"  # in RUN_DIR/stores: a simulation made it, a rerun may empty it
RUN_LOCK = ".fedprefix-run.lock"  # in RUN_DIR: held by the run using it
RUN_MARK = ".fedprefix-run"  # in RUN_DIR: a run claimed it before writing there; a rerun may write into it


class SimulationError(FedPrefixError):
    """A simulated federation could not start or did not finish."""


def check_run_folder(config: FederationConfig) -> None:
    """SimulationError where the run cannot go into `config.run_dir`: a file there, node stores
    that no simulation made (which a run would empty), or a folder holding files that no run made
    (a run writes data/ and run.json into it). The CLI asks before it writes any data."""
    run_dir = Path(config.run_dir)
    # the name `runs` lists (a link's own, not its target's): `show ID` and the dashboard take ids only
    if not is_run_id(name := Path(os.path.abspath(run_dir)).name):
        raise SimulationError(
            f"run folder {run_dir}: its name {name!r} is no run id (letters, digits, '.', '_', '-'; "
            "up to 128), which `fedprefix runs`, `show` and the dashboard name runs by: choose another --out"
        )
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise SimulationError(f"run folder {run_dir}: {folder} is a file, not a folder")
            break
    stores = Path(config.node_store_root)
    if not config.store_root and stores.exists() and not (stores / SIMULATION_MARK).is_file():
        raise SimulationError(
            f"{stores} exists and no simulation made it: choose another --out, or --set store-root=FOLDER"
        )
    if run_dir.is_dir() and any(p.name != RUN_LOCK for p in run_dir.iterdir()) and not made_by_a_run(run_dir):
        raise SimulationError(
            f"run folder {run_dir} holds files that no fedprefix run made (a run writes data/, run.json "
            f"and more into it): choose a new or empty --out folder"
        )


def claim_run_folder(config: FederationConfig) -> None:
    """check_run_folder, then make the run folder and mark it as a run's, before anything is
    written into it (a run's data, say): a rerun then knows a run made what it finds there."""
    check_run_folder(config)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # its files are its owner's: also under umask 0
    (run_dir / RUN_MARK).write_text("a fedprefix run's folder: a later run into it replaces what runs wrote\n")


_held: dict[Path, int] = {}  # run folders this process holds (the CLI holds one across simulate())


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR's lock (made, with the folder, where missing) for a run's length, from before
    its data is written; SimulationError at once if another run holds it: a second run into the
    folder replaced the first's data and emptied its record and node stores under it, then
    reported its own run, mixed with the first one's nodes, as finished. Held again by the same
    process (the CLI around simulate()), it is only counted."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    key.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = FileLock(key / RUN_LOCK, timeout=0, mode=0o600)
    try:
        lock.acquire()
    except Timeout:
        raise SimulationError(f"another run is using {run_dir}: wait for it to end, or give another --out") from None
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        lock.release()


def made_by_a_run(folder: Path) -> bool:
    """Whether a run made `folder`: its mark, its run record (runs before the mark), or its node
    stores' mark (one of those stopped before its record)."""
    try:
        read_info(folder)
        return True
    except RunFolderError:
        return (folder / RUN_MARK).is_file() or (folder / "stores" / SIMULATION_MARK).is_file()


def fresh_node_stores(folder: Path) -> None:
    """An empty folder for the run's node stores. What an earlier simulation left there goes
    (its mark says so); a folder that no simulation made is never touched (check_run_folder)."""
    remove_node_stores(folder)
    folder.mkdir(parents=True)
    (folder / SIMULATION_MARK).write_text(
        "node stores of a fedprefix simulation: the next run into this folder removes them\n"
    )


def remove_node_stores(folder: Path) -> None:
    """Remove a simulation's node stores, their mark last: a removal stopped midway (Ctrl-C)
    leaves a folder the next run still knows as a simulation's, and so may empty."""
    if not folder.exists():
        return
    for child in folder.iterdir():
        if child.name == SIMULATION_MARK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / SIMULATION_MARK).unlink(missing_ok=True)
    folder.rmdir()
