"""Writers' locks and what a killed writer leaves behind.

Writers of one user hold ``<root>/<user_id>.lock`` (filelock) from reading the old
header to writing the new file, which replaces the old one atomically (temp file, fsync,
rename, fsync folder; common/files.py): a writer killed at any point leaves the previous
version, and perhaps a temp file that the next writer of that file removes. The counter
state (rollback.py) has its own lock, ``<root>/.counters.lock``, always taken second.
On a case-insensitive filesystem 'Alice' and 'alice' share one file; the owner check
then refuses the other user's file rather than mixing them up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import StoreBusyError, about

__all__ = ["file_lock", "remove_temp_files"]


@contextmanager
def file_lock(path: Path, timeout: float, user_id: str | None) -> Iterator[None]:
    """Hold the lock file `path` (across processes and threads); StoreBusyError after `timeout` s."""
    lock = FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise StoreBusyError(
            about(user_id, f"{path.name} stayed locked for {timeout:g} s by another writer"), user_id
        ) from None
    try:
        yield
    finally:
        lock.release()


def remove_temp_files(root: Path, target: str) -> None:
    """Remove temp files a killed writer of `target` left (atomic_write_bytes names them
    ``.<target>.*.tmp``); callers hold the lock of `target`, so no live writer owns one."""
    # mkstemp adds exactly 8 random characters; the fixed length keeps the pattern from
    # matching another user's temp file (user "a" vs user "a.fpx.b").
    for tmp in root.glob(f".{target}.????????.tmp"):
        tmp.unlink(missing_ok=True)
