"""Writers' locks, and writes that a killed writer cannot leave half made.

Writers of one user (all of its parts) hold ``<root>/<user_id>.lock`` (filelock) from
reading the old headers to renaming the new files. A write is journalled:

1. every new file (each part and its rollback record) is written and fsynced as a temp file
   beside its target (one name per target: `staged_name`);
2. the journal ``<root>/.<user_id>.journal`` names the files the write puts in and those it
   removes; it is renamed into place and the folder fsynced: from then on the write is decided;
3. the removed files are unlinked, the staged ones renamed over their targets (parts first,
   records second, see rollback.py), the folders fsynced, and the journal removed.

A failure before 2 removes the temps and changes nothing. From 2 on, whatever stops the
writer (an error, SIGKILL, a power loss), the next holder of the user's lock (a save, a key
change, a delete, or a load that found the user's files mixed) finds the journal and does
step 3 again (`recover`; every step of it can be repeated). So a user's parts are never left
part new, part old: before journals, a writer killed between two renames left them so, and
loads refused them until `reset-rollback`, which kept the mix. Ctrl-C and SIGTERM wait for
step 3 (common.signals).

The journal also holds, for each file, the SHA-256 it had when the write was decided and the
one the write gives it: a write is completed only while every file is one or the other. A
journal whose write was stopped, followed by a version of fedprefix that reads no journals
writing the user again (a downgrade and back), is stale: it is removed and the files are left
as they are (completing it had deleted the later write's shared part). Its keys are those of
format 1, so a fedprefix reading format 1 refuses it by its version rather than removing it.

A temp file without a journal belongs to a write that was never decided; the user's next
lock removes it, one unlink per file the user may have (a scan of the store folder per save
made a save 10x slower in a store of 10,000 users). A journal must name only its own user's
files (checked when it is read back), so one put in the folder moves nothing else, and every
file it completes is authenticated on load like any other; one that does not parse (or a
folder or link at its name) is not this store's and is removed, leaving the files as they
are, while one naming another user's files is refused and kept: on a case-insensitive
filesystem 'Alice' and 'alice' share one journal, as they share one file, where the owner
check refuses the other user's file rather than mixing them up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from ..files import fsync_dir, read_regular, write_temp
from ..signals import signals_deferred
from .errors import StoreBusyError, StoreError, StoreIOError, UnknownVersionError, about

__all__ = ["file_lock", "journal_path", "recover", "remove_earlier_temp_files", "write_all"]

Staged = tuple[Path, Path]  # (temp file, target)

READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # the lock file cannot be made: nobody can write here
JOURNAL_VERSION = 2  # 2: each file with its SHA-256 before and after (1, names only, is still completed)
log = logging.getLogger(__name__)


@contextmanager
def file_lock(path: Path, timeout: float, user_id: str | None) -> Iterator[None]:
    """Hold the lock file `path` (across processes and threads); StoreBusyError after `timeout` s."""
    lock = FileLock(path, timeout=timeout, mode=0o600)  # whatever the umask: the store is its owner's
    try:
        lock.acquire()
    except Timeout:
        raise StoreBusyError(
            about(user_id, f"{path.name} stayed locked for {timeout:g} s by another writer"), user_id
        ) from None
    except OSError as exc:
        if exc.errno in READ_ONLY:  # a store that cannot be written: readers go on without the lock
            if exc.errno != errno.EROFS and (owner := _foreign_owner(path)) is not None:  # still an OSError
                problem = (
                    f"its lock file {path.name} belongs to another user (uid {owner}) and cannot be opened: "
                    "remove it (it holds no data), or run as that user"
                )
                raise StoreIOError.of(user_id, exc, problem) from None
            raise
        # a link (loop) or a folder put where the lock file goes: every refusal is a StoreError
        message = f"its lock file {path.name} cannot be used ({exc.strerror})"
        raise StoreError(about(user_id, message), user_id) from None
    try:
        yield
    finally:
        lock.release()


def _foreign_owner(path: Path) -> int | None:
    """The uid owning the lock file `path` where that is not this process's user, else None."""
    try:
        uid = path.stat().st_uid
    except OSError:
        return None
    return uid if uid != os.geteuid() else None


def journal_path(root: Path, user_id: str) -> Path:
    """The journal of `user_id`'s writes (user ids never start with '.': no part's name)."""
    return root / f".{user_id}.journal"


def staged_name(target: str) -> str:
    """The temp file a writer of `target` stages it in (callers hold the user's lock: one writer)."""
    return f".{target}.staged.tmp"


def remove_earlier_temp_files(root: Path, target: str) -> None:
    """Remove the temp files of `target` that writers of earlier versions left: staged under
    mkstemp's names (``.<target>.XXXXXXXX.tmp``), which takes a scan of the folder, or a removed
    file set aside (``.<target>.aside.tmp``); the caller holds the lock of `target`."""
    (root / f".{target}.aside.tmp").unlink(missing_ok=True)
    # mkstemp adds exactly 8 random characters; the fixed length keeps the pattern from
    # matching another user's temp file (user "a" vs user "a.fpx.b").
    for tmp in root.glob(f".{target}.????????.tmp"):
        tmp.unlink(missing_ok=True)


def write_all(journal: Path, files: Sequence[tuple[Path, bytes]], removed: Sequence[Path], durable: bool) -> None:
    """Put every (target, data) in and remove the `removed` files, as one journalled write (see
    the module's docstring); `journal` is the user's (journal_path), in the folder that every
    target is in or under. Failing before the journal is in changes nothing; after it, the
    write completes here or under the user's next lock (`recover`). Ctrl-C and SIGTERM wait
    for the renames and reach their handlers after them."""
    staged: list[Staged] = []
    before = [_digest(path) for path in (*(target for target, _ in files), *removed)]  # under the user's lock
    try:
        for target, data in files:  # one by one: a failure discards the earlier
            target.parent.mkdir(mode=0o700, exist_ok=True)
            staged.append((write_temp(target, data, durable, staged_name(target.name)), target))
        with signals_deferred() as received:
            if durable:  # every staged file's entry durable before the journal decides on them (the
                # journal's own folder is synced with it); else a power loss could keep the journal
                # and lose a staged rollback record, which recovery would then skip
                for folder in dict.fromkeys(target.parent for _, target in staged if target.parent != journal.parent):
                    fsync_dir(folder)
            after = [hashlib.sha256(data).hexdigest() for _, data in files]
            _decide(journal, _plan(journal.parent, [t for _, t in staged], removed, after, before), durable)
            _finish(journal, staged, removed, durable)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)  # to the handler put back: KeyboardInterrupt, or the exit
    except BaseException:
        if not os.path.lexists(journal):  # not decided (or done): nothing of it is left to make
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        raise


def recover(journal: Path, own_files: Collection[str], durable: bool) -> None:
    """Complete the decided write whose journal a killed or failed writer left at `journal`;
    without one, remove what a killed writer staged. The caller holds the user's lock.
    `own_files`: the names, relative to the journal's folder, that the user's files may have."""
    root = journal.parent
    try:
        raw = read_regular(journal, follow_links=False)
    except FileNotFoundError:
        raw = None
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ELOOP):
            raise
        raw = b""  # a link, or not a file: not this store's
    plan = None if raw is None else _parsed(raw, own_files, journal)
    if plan is None:  # no write decided: one unlink per file, not a scan of the folder
        if raw is not None:
            _remove_foreign(journal)
        for path in (journal, *(root / name for name in own_files)):
            path.with_name(staged_name(path.name)).unlink(missing_ok=True)
        return
    targets = [root / entry[0] for entry in plan["write"]]
    staged = [(target.with_name(staged_name(target.name)), target) for target in targets]
    if plan["format_version"] > 1 and (replaced := _replaced_since(root, plan)):
        log.warning(
            "prefix store: %s is of a write whose file %s has since been replaced (by a fedprefix that does not "
            "read journals?): the journal is removed and the files left as they are",
            journal.name,
            replaced,
        )
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        return
    _roll_forward(journal, staged, [root / entry[0] for entry in plan["remove"]], durable)


def _digest(path: Path) -> str | None:
    """The SHA-256 of the regular file at `path`; None where there is none (or a link, a folder)."""
    try:
        return hashlib.sha256(read_regular(path, follow_links=False)).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ELOOP):
            raise
        return None


def _replaced_since(root: Path, plan: dict) -> str | None:
    """The first file that is neither what the journal's write found nor what it makes: a target
    still staged must hold its old content, a renamed one its new, a removed file its old or
    none; None when every file is so (a write stopped anywhere in its step 3)."""
    for name, after, before in plan["write"]:
        target = root / name
        tmp = target.with_name(staged_name(target.name))
        if os.path.lexists(tmp):
            if _digest(tmp) != after or _digest(target) != before:
                return name
        elif _digest(target) != after:
            return name
    for name, before in plan["remove"]:
        if _digest(root / name) not in (None, before):
            return name
    return None


def _remove_foreign(journal: Path) -> None:
    """Remove what is at the journal's name but no journal of this store's: a file, a link, a folder."""
    if journal.is_dir() and not journal.is_symlink():
        shutil.rmtree(journal)
    else:
        journal.unlink(missing_ok=True)


def _plan(
    root: Path, targets: Sequence[Path], removed: Sequence[Path], after: Sequence[str], before: Sequence[str | None]
) -> bytes:
    """The journal's text: the files the write puts in, in their order, as [name, SHA-256 after,
    SHA-256 before (None: none)], and those it removes as [name, SHA-256 before]; names relative
    to `root`."""
    names = [path.relative_to(root).as_posix() for path in (*targets, *removed)]
    n = len(targets)
    write = [list(entry) for entry in zip(names[:n], after, before[:n], strict=True)]
    remove = [list(entry) for entry in zip(names[n:], before[n:], strict=True)]
    return json.dumps({"format_version": JOURNAL_VERSION, "remove": remove, "write": write}, sort_keys=True).encode()


def _parsed(raw: bytes, own_files: Collection[str], journal: Path) -> dict | None:
    """The journal's plan, or None if it is not one this store wrote (for these files)."""
    try:
        plan = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(plan, dict):
        return None
    version = plan.get("format_version")
    if type(version) is int and version > JOURNAL_VERSION:  # a newer write this code cannot complete
        user_id = journal.name[1 : -len(".journal")]
        message = (
            f"its journal {journal.name} is format {version}, written by a newer fedprefix (this one "
            f"reads format {JOURNAL_VERSION}): use that version"
        )
        raise UnknownVersionError(about(user_id, message), user_id)
    if version == 2 and set(plan) == {"format_version", "remove", "sha256", "write"}:
        # two development versions (c0a99a1, ac5dd2a) wrote the names and their digests apart:
        # completed as format 1 is (names only), not taken for another program's and dropped
        plan = {"format_version": 1, "remove": plan["remove"], "write": plan["write"]}
        version = 1
    if set(plan) != {"format_version", "remove", "write"} or type(version) is not int or version < 1:
        return None
    write, remove = plan["write"], plan["remove"]
    if not isinstance(write, list) or not isinstance(remove, list):
        return None
    if version == 1:  # names only: completed without checks, as that version did
        if not all(isinstance(name, str) for name in write + remove):
            return None
        write, remove = [[name, None, None] for name in write], [[name, None] for name in remove]
    elif not all(_entry(e, (_is_digest, _is_digest_or_none)) for e in write) or not all(
        _entry(e, (_is_digest_or_none,)) for e in remove
    ):
        return None
    names = [entry[0] for entry in write + remove]
    if foreign := next((name for name in names if name not in own_files), None):
        # this store's journal, naming another user's file: on a case-insensitive filesystem
        # 'Alice' and 'alice' share the journal, and removing it lost Alice's decided write
        user_id = journal.name[1 : -len(".journal")]
        message = (
            f"its journal {journal.name} names {foreign!r}, not one of its files (another user's on a "
            "case-insensitive filesystem?): complete that user's write with their own id, or remove the journal"
        )
        raise StoreError(about(user_id, message), user_id)
    return {"format_version": version, "write": write, "remove": remove}


def _entry(entry, checks) -> bool:
    """`entry` is [name, *values], each value passing its check."""
    return (
        isinstance(entry, list)
        and len(entry) == 1 + len(checks)
        and isinstance(entry[0], str)
        and all(check(value) for check, value in zip(checks, entry[1:], strict=True))
    )


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_digest_or_none(value) -> bool:
    return value is None or _is_digest(value)


def _decide(journal: Path, plan: bytes, durable: bool) -> None:
    """Put the journal in place (atomically, durably): the write is decided once it is there."""
    tmp = write_temp(journal, plan, durable, staged_name(journal.name))
    try:
        os.replace(tmp, journal)
        if durable:
            fsync_dir(journal.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)  # if this fails, the journal stands and the write with it
        raise


def _finish(journal: Path, staged: Sequence[Staged], removed: Sequence[Path], durable: bool) -> None:
    """_roll_forward, again at once if it failed: a rename the filesystem failed once and then
    made is no failure. What it still cannot do (a rename, a folder's sync, the journal's
    removal) is raised saying that the user's next lock completes it; an exception not the
    filesystem's (a time limit's TimeoutError) is raised once the write is made where it could be."""
    try:
        _roll_forward(journal, staged, removed, durable)
    except BaseException as exc:
        with suppress(OSError):
            _roll_forward(journal, staged, removed, durable)
        if not isinstance(exc, OSError) or exc.errno is None:
            raise
        if os.path.lexists(journal):
            placed = not any(os.path.lexists(path) for path in (*(tmp for tmp, _ in staged), *removed))
            what = (
                "the write is in place but not yet durable" if placed else "the write is decided but not all in place"
            )
            raise OSError(
                exc.errno, f"{exc.strerror or exc}; {what}: the user's next load or save completes it", exc.filename
            ) from exc


def _roll_forward(journal: Path, staged: Sequence[Staged], removed: Sequence[Path], durable: bool) -> None:
    """Step 3 of a decided write; every step of it can be repeated (a file already renamed has no
    temp file left)."""
    for path in removed:
        path.unlink(missing_ok=True)
    for tmp, target in staged:
        if os.path.lexists(tmp):
            os.replace(tmp, target)
    if durable:
        for folder in dict.fromkeys([journal.parent, *(path.parent for path in (*removed, *(t for _, t in staged)))]):
            fsync_dir(folder)
    journal.unlink(missing_ok=True)  # once all is durable: a journal found again only repeats it
