"""Atomic file writes: a reader sees the old file or the new one, never half of either; and
reads that take only a regular file."""

from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

try:
    import fcntl

    FULL_FSYNC = getattr(fcntl, "F_FULLFSYNC", None)  # macOS
except ImportError:  # Windows
    fcntl = FULL_FSYNC = None
NOT_SUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOTTY}


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


def write_temp(path: Path, data: bytes, durable: bool, name: str | None = None) -> Path:
    """`data` in a new temp file `.<name>.XXXXXXXX.tmp` beside `path` (fsynced if durable), for a
    later rename onto `path`; nothing is left behind if writing fails. `name`: the temp file's
    own name instead, for a caller whose lock makes it the only writer of `path` (a leftover of
    that name is replaced)."""
    if name is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    else:
        tmp = path.parent / name
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                sync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def sync(fd: int) -> None:
    """Flush what was written to `fd` (a file's data, a folder's entries) to the drive. On macOS
    fsync leaves it in the drive's own cache, where a power loss still loses it: F_FULLFSYNC
    there, or fsync where a filesystem does not take it (some network ones)."""
    if FULL_FSYNC is not None:
        try:
            fcntl.fcntl(fd, FULL_FSYNC)
            return
        except OSError as exc:  # only "not here": after a failed flush (EIO) fsync may report success
            if exc.errno not in NOT_SUPPORTED:
                raise
    os.fsync(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, unlinks) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        sync(fd)
    finally:
        os.close(fd)


def open_private_append(path: str | os.PathLike):
    """`path` opened to append bytes; created readable by its owner alone (0600), as every file a
    run writes is: a node's traceback in a run's log may quote what it was reading."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def open_regular(path: str | os.PathLike, follow_links: bool = True):
    """`path` opened for reading (binary) if it is a regular file, else OSError saying what it is:
    a FIFO would block its reader, a device such as /dev/zero never end; `follow_links=False` also
    refuses a symbolic link (one that leads out of a folder a server reads). EINVAL: not a regular
    file; ELOOP: a link, not followed; FileNotFoundError: nothing there (or a link to nothing)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)  # opening a FIFO must not wait for a writer
    except IsADirectoryError:
        raise OSError(errno.EINVAL, "is not a regular file", str(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise OSError(errno.ELOOP, "is a symbolic link (not followed)", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "is not a regular file", str(path))
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, follow_links: bool = True) -> bytes:
    """The bytes of `path`, if it is a regular file (see open_regular)."""
    with open_regular(path, follow_links) as fh:
        return fh.read()


def left_temp_folders(parent: Path, prefix: str, suffixes: Sequence[str] = ("",)) -> list[Path]:
    """The folders (not links) in `parent` named `prefix`, mkdtemp's 8 characters and one of
    `suffixes`: what writers that go through a temp folder left where they were killed."""
    return [
        path
        for path in parent.glob(f"{glob.escape(prefix)}????????*")
        if path.name[len(prefix) + 8 :] in suffixes and path.is_dir() and not path.is_symlink()
    ]
