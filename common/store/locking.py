"""Writers' locks, staged writes, and what a killed writer leaves behind.

Writers of one user (all of its parts) hold ``<root>/<user_id>.lock`` (filelock) from
reading the old headers to renaming the new files. A write is staged: every new file
(each part and its rollback record) is first written and fsynced as a temp file beside
its target; only when all are ready are they renamed over their targets (parts first,
records second, see rollback.py), then the folders are fsynced. A failure before the
renames removes the temps and changes nothing (one after them says what it left: commit);
a writer killed at any point leaves each
file old or new, and perhaps temp files that the next writer of that user removes: one
name per target (`staged_name`), so that this takes one unlink, not a scan of the store
folder (a scan per save made a save 10x slower in a store of 10,000 users).
Ctrl-C and SIGTERM wait for the renames to end (`common.signals`), so that a save of two
parts is not stopped with one part new and the other old; only a writer killed outright
(SIGKILL, a power loss) between two renames leaves that mix, each file authentic, and
loads refuse it (the parts carry different write ids, rollback.check_parts) until reset.
On a case-insensitive filesystem 'Alice' and 'alice' share one file; the owner check
then refuses the other user's file rather than mixing them up.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from ..files import fsync_dir, write_temp
from ..signals import signals_deferred
from .errors import StoreBusyError, StoreError, about

__all__ = ["Staged", "commit", "discard", "file_lock", "remove_temp_files", "stage", "write_all"]

Staged = tuple[Path, Path]  # (temp file, target)


READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # the lock file cannot be made: nobody can write here


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
    except OSError as exc:
        if exc.errno in READ_ONLY:  # a store that cannot be written: readers go on without the lock
            raise
        # a link (loop) or a folder put where the lock file goes: every refusal is a StoreError
        message = f"its lock file {path.name} cannot be used ({exc.strerror})"
        raise StoreError(about(user_id, message), user_id) from None
    try:
        yield
    finally:
        lock.release()


def staged_name(target: str) -> str:
    """The temp file a writer of `target` stages it in (callers hold the user's lock: one writer)."""
    return f".{target}.staged.tmp"


def aside_name(target: str) -> str:
    """Where a writer that removes `target` sets it aside until its new files are in."""
    return f".{target}.aside.tmp"


def remove_temp_files(root: Path, target: str, earlier_versions: bool = False) -> None:
    """Remove the temp file a killed writer of `target` left; callers hold the lock of `target`,
    so no live writer owns one. `earlier_versions`: also those of versions that staged under
    mkstemp's names (``.<target>.XXXXXXXX.tmp``), which takes a scan of the folder."""
    (root / staged_name(target)).unlink(missing_ok=True)
    (root / aside_name(target)).unlink(missing_ok=True)
    if earlier_versions:
        # mkstemp adds exactly 8 random characters; the fixed length keeps the pattern from
        # matching another user's temp file (user "a" vs user "a.fpx.b").
        for tmp in root.glob(f".{target}.????????.tmp"):
            tmp.unlink(missing_ok=True)


def stage(target: Path, data: bytes, durable: bool) -> Staged:
    """Write `data` to `target`'s temp file (staged_name), beside it."""
    target.parent.mkdir(mode=0o700, exist_ok=True)
    return write_temp(target, data, durable, staged_name(target.name)), target


def discard(staged: Sequence[Staged]) -> None:
    """Remove staged temp files that were not committed."""
    for tmp, _ in staged:
        tmp.unlink(missing_ok=True)


def commit(staged: Sequence[Staged], durable: bool) -> None:
    """Rename every staged file over its target, in order; then make the renames durable.

    An exception once the first rename is made (a signal handler's other than Ctrl-C's and
    SIGTERM's, which write_all defers) finishes the renames before it goes on: a user's parts
    stay one write, where a half-made one would be refused until `reset-rollback`. A rename
    the filesystem failed once and then made is no failure; one it kept failing is raised
    saying that the write is partly made, as is a sync that failed after the renames."""
    renamed = 0
    try:
        for tmp, target in staged:
            os.replace(tmp, target)
            renamed += 1
    except BaseException as exc:
        if not (renamed or (staged and not staged[0][0].exists())):  # nothing went in
            raise
        for tmp, target in staged:  # the first is in: finish the rest
            with suppress(OSError):
                if tmp.exists():
                    os.replace(tmp, target)
        if not isinstance(exc, OSError) or exc.errno is None:  # not the filesystem's (a time limit's TimeoutError)
            raise
        if any(tmp.exists() for tmp, _ in staged):
            raise _partly(
                exc,
                "the write stopped between its renames, so its files may be part new, part old: "
                "if loads refuse them, `fedprefix store reset-rollback` keeps what is there",
            ) from exc
    if durable:
        try:
            for folder in dict.fromkeys(target.parent for _, target in staged):
                fsync_dir(folder)
        except OSError as exc:
            raise _partly(
                exc, "the write is in place, but a power loss may still undo it (the folder could not be synced)"
            ) from exc


def _partly(exc: OSError, what: str) -> OSError:
    """`exc` (its errno and file kept) saying what of the write was made."""
    return OSError(exc.errno, f"{exc.strerror or exc}; {what}", exc.filename)


def write_all(files: Sequence[tuple[Path, bytes]], removed: Sequence[Path], durable: bool) -> None:
    """Stage every (target, data), set the `removed` files aside (renamed to temp names), then
    rename the staged ones in order; failing before the first rename puts the removed files
    back and changes nothing (a save that deleted a dropped part first lost it when a rename
    then failed). A writer killed after the renames leaves the set-aside file as a temp file,
    not as a part (deleting it only then kept it a part). Ctrl-C and SIGTERM wait for the
    renames (a save of two parts must not stop halfway) and reach their handlers after them."""
    staged: list[Staged] = []
    try:
        for target, data in files:
            staged.append(stage(target, data, durable))  # one by one: a failure discards the earlier
        with signals_deferred() as received:
            aside = _set_aside(removed)
            try:
                commit(staged, durable)
            except BaseException:
                if staged and staged[0][0].exists():  # no new file went in: the removed ones come back
                    _put_back(aside)
                raise
            for tmp, _ in aside:
                with suppress(OSError):  # a leftover is a temp file, which the user's next writer removes
                    tmp.unlink()
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)  # to the handler put back: KeyboardInterrupt, or the exit
    except BaseException:
        discard(staged)
        raise


def _set_aside(paths: Sequence[Path]) -> list[Staged]:
    """Rename each of `paths` that exists to its aside_name beside it; -> [(temp name, path)]. A
    failure puts back the ones already renamed."""
    moved: list[Staged] = []
    try:
        for path in paths:
            tmp = path.with_name(aside_name(path.name))
            try:
                os.replace(path, tmp)
            except FileNotFoundError:
                continue
            moved.append((tmp, path))
    except BaseException:
        _put_back(moved)
        raise
    return moved


def _put_back(moved: Sequence[Staged]) -> None:
    for tmp, path in moved:
        with suppress(OSError):
            os.replace(tmp, path)
