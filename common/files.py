"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True, sync_dir: bool = True) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync, rename, fsync the folder.

    Same folder so the rename is atomic (one filesystem); the folder fsync makes the
    rename itself survive a power loss (`sync_dir=False` leaves that to a later fsync).
    """
    path = Path(path)
    tmp = write_temp(path, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable and sync_dir:
        fsync_dir(path.parent)


def write_temp(path: Path, data: bytes, durable: bool) -> Path:
    """`data` in a new temp file `.<name>.XXXXXXXX.tmp` beside `path` (fsynced if durable), for a
    later rename onto `path`; nothing is left behind if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, unlinks) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
