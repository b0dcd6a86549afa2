"""A user's lock, for writers and for readers, and reads where no lock can be taken. A mixin of
PrefixStore (api.py), whose names, paths and journals these use.

Writers of one user hold its lock from reading the old headers to the last rename (locking.py);
a reader holds it too, so that it finds no write midway. A store that cannot be written here (a
read-only mount, as a server may read it) has no lock to take, while a writer with another view
of the same folder (the mount's source, another machine's NFS client) may still be midway: then
a user's parts read one after the other can come from two writes, or look rolled back for a
moment. `_read_together` reads such a user again while its files change, until one read holds
(every part from one write), and says so where a write stays unfinished: before it, a server on
a read-only mount answered with a mix of two saves' parts.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from .errors import PartsMismatchError, RollbackError, StoreBusyError, UnknownUserError, about
from .format import FileHeader, split_store_name
from .locking import READ_ONLY, file_lock, recover
from .rollback import user_files

__all__ = ["LOCKLESS_RETRY_S", "UserLocks"]

LOCKLESS_RETRY_S = 2.0  # a writer finishes its renames within milliseconds; a killed one never does
Result = TypeVar("Result")


class UserLocks:
    """PrefixStore's locks and lockless reads (see api.py for what these call)."""

    def _read_together(self, name: str, read: Callable[[], Result]) -> Result:
        """`read()` of `name`'s user's files under the user's lock, or, where the store cannot be
        written here, read again while a writer elsewhere is at work (the files changed during
        the read, or its journal is there): a refusal that a write midway explains (rollback,
        parts, a first save, NFS's stale handle) stands at once where neither is so (a genuine
        one is not read again), and after LOCKLESS_RETRY_S it is StoreBusyError: files still
        changing, or a write whose writer stopped midway (only a process that can write
        completes it)."""
        deadline = time.monotonic() + LOCKLESS_RETRY_S
        while True:
            with self._reader_lock(name) as locked:
                before = None if locked else self._files_now(name)
                try:
                    return read()
                except (RollbackError, UnknownUserError, OSError) as exc:
                    if locked or not self._midway(exc, name):
                        raise
                    changed, journal = self._files_now(name) != before, os.path.lexists(self._journal(name))
                    if not (changed or journal):  # no writer at work: about the files as they are
                        raise
                    if time.monotonic() >= deadline:  # a journal and files that stay: its writer is gone
                        raise self._busy(name, changed) from None
            time.sleep(0.01)

    def _midway(self, exc: BaseException, name: str) -> bool:
        """Whether refusing `name`'s files with `exc` may be a write seen midway, to read again: a
        rollback or a parts mismatch, NFS's stale handle of a file renamed over, the user unknown
        while a first save's journal is there (its writer between deciding and renaming)."""
        if isinstance(exc, RollbackError):
            return True
        if isinstance(exc, UnknownUserError):
            return os.path.lexists(self._journal(name))
        return isinstance(exc, OSError) and exc.errno == errno.ESTALE

    def _files_now(self, name: str) -> list[tuple[int, int, int] | None]:
        """What identifies the user's files now: (inode, size, mtime) of each of its parts and
        records, None for one not there (a write renames new files in)."""
        owner, _ = split_store_name(name)
        stamps = []
        for relative in sorted(user_files(owner)):
            try:
                stat = os.lstat(self.root / relative)
                stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:
                stamps.append(None)
        return stamps

    def _busy(self, name: str, changed: bool) -> StoreBusyError:
        """What a lockless reader says after LOCKLESS_RETRY_S: files still `changed` by a writer
        elsewhere, or a write whose writer stopped midway (its journal stays)."""
        owner, _ = split_store_name(name)
        if changed:
            problem = f"its files kept changing for {LOCKLESS_RETRY_S:g} s while read (a writer elsewhere): try again"
        else:
            problem = (
                f"a write of it is unfinished (its writer stopped midway: {self._journal(name).name}) and this "
                "store cannot be written here: the next save or load of the user where the store can be "
                "written completes it"
            )
        return StoreBusyError(about(owner, problem), owner)

    @staticmethod
    def _check_one_write(user_id: str, headers: Mapping[str, FileHeader]) -> None:
        """Refuse parts read from different writes (a lockless read while a writer renamed): each
        was checked against the other's header as it was read, at two moments."""
        write_ids = {header.write_id for header in headers.values() if header.parts is not None}
        if len(write_ids) > 1:
            problem = "its parts were read from two writes (a write was midway)"
            raise PartsMismatchError(about(user_id, problem), user_id)

    @contextmanager
    def _reader_lock(self, name: str) -> Iterator[bool]:
        """The user's lock for a reader; yields whether it holds it: not where the store cannot
        be written here (see the module's docstring, and _read_together).

        UnknownUserError, and no lock file made, where no part of the user is stored: a reader
        of made-up user ids (a server's requests) would otherwise leave a lock file for each."""
        self._require_stored(name)
        lock = self._user_lock(name)
        try:
            lock.__enter__()
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise
            lock = None
        try:
            yield lock is not None
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)

    @contextmanager
    def _stored_user_lock(self, user_id: str) -> Iterator[None]:
        """_user_lock for a change to a stored user (a delete, a key change): UnknownUserError,
        and no lock file made, for a user of whom nothing is stored."""
        self._require_stored(user_id)
        with self._user_lock(user_id):
            yield

    def _require_stored(self, name: str) -> None:
        """UnknownUserError unless a part of `name`'s user is stored, or a write of one is decided."""
        owner, _ = split_store_name(name)
        if not self.stored_parts(owner) and not os.path.lexists(self._journal(owner)):
            raise UnknownUserError.of(owner)

    @contextmanager
    def _user_lock(self, name: str) -> Iterator[None]:
        """Serialize writers of one user (all its parts) across processes and threads; first
        complete a write of the user that its writer left decided but not made (locking.py)."""
        owner, _ = split_store_name(name)
        with file_lock(self.root / f"{owner}.lock", self.lock_timeout, owner):
            recover(self._journal(owner), user_files(owner), self.durable)
            yield
