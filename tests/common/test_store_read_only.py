"""A store read where it cannot be written (a server on a read-only mount) while a writer with
another view of the folder saves: a read returns one write's parts or a clear refusal, never a
mix; and a lock file another user made names that user."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fedprefix.common.store import PrefixStore, StoreBusyError, StoreIOError, user_locks
from fedprefix.common.store import locking as store_locking

from tests.common.test_store_hardening import RAW, make_prefix, same

ROOT = Path(__file__).parents[2]


@pytest.fixture
def store(tmp_path) -> PrefixStore:
    store = PrefixStore(tmp_path / "store", scrypt_n=2**10)
    store.save_parts("alice", {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    return store


@pytest.fixture
def read_only_here(monkeypatch):
    """This process's reads find no lock to take (EROFS), while `writing[0]` lets its writes lock."""
    real, writing = user_locks.file_lock, [False]

    def lock(*args, **kwargs):
        if writing[0]:
            return real(*args, **kwargs)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(user_locks, "file_lock", lock)
    return writing


def test_parts_read_while_a_writer_elsewhere_saves_come_from_one_write(store, read_only_here, monkeypatch):
    """Between the reader's two parts a save lands: before, the reader returned the old personal
    part with the new shared one (a server answered with that mix); now it reads again."""
    real_decrypt, saved = store._decrypt, []

    def decrypt(name, *args, **kwargs):
        opened = real_decrypt(name, *args, **kwargs)
        if not saved:  # the first part is read: a writer elsewhere saves both parts now
            saved.append(True)
            read_only_here[0] = True
            store.save_parts("alice", {"personal": make_prefix(3), "shared": make_prefix(4)}, RAW)
            read_only_here[0] = False
        return opened

    monkeypatch.setattr(store, "_decrypt", decrypt)
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(3)) and same(parts["shared"], make_prefix(4))
    saved.clear()  # verify_user reads the parts together as well (it refused the pair)
    infos = store.verify_user("alice", RAW)
    assert saved and [info.user_id for info in infos] == ["alice", "alice@shared"]
    assert infos[0].counter == infos[1].counter == 3


def _save_before_each(store, read_only_here, monkeypatch, method: str, fail: OSError | None = None) -> None:
    """`store.<method>` saves alice anew (as a writer elsewhere) before each call; with `fail`, before
    the first call only, which then raises `fail`."""
    real, calls = getattr(store, method), []

    def read(name, *args, **kwargs):
        calls.append(name)
        if fail is not None and len(calls) > 1:
            return real(name, *args, **kwargs)
        read_only_here[0] = True
        store.save_parts("alice", {"personal": make_prefix(len(calls)), "shared": make_prefix(-len(calls))}, RAW)
        read_only_here[0] = False
        if fail is not None:
            raise fail
        return real(name, *args, **kwargs)

    monkeypatch.setattr(store, method, read)


def test_files_that_keep_changing_while_read_are_busy_not_a_mismatch(store, read_only_here, monkeypatch):
    """A writer elsewhere saving between any two reads: "busy, try again" (503), not a parts
    mismatch, which reads as tampering and advises reset-rollback."""
    monkeypatch.setattr(user_locks, "LOCKLESS_RETRY_S", 0.3)
    _save_before_each(store, read_only_here, monkeypatch, "_decrypt")
    with pytest.raises(StoreBusyError, match="'alice': its files kept changing for 0.3 s while read"):
        store.load_parts("alice", RAW)


@pytest.mark.parametrize("read", ["load", "load_parts"])
def test_a_stale_nfs_handle_of_a_file_renamed_over_is_read_again(store, read_only_here, monkeypatch, read):
    """NFS answers ESTALE for a file a writer on another client renamed over: a 500 before."""
    _save_before_each(store, read_only_here, monkeypatch, "_read_checked", OSError(errno.ESTALE, "Stale file handle"))
    loaded = getattr(store, read)("alice", RAW)
    personal = loaded if read == "load" else loaded["personal"]
    assert same(personal, make_prefix(1))  # read again after the save that made the handle stale


def test_a_write_left_unfinished_is_named_to_a_reader_that_cannot_complete_it(store, read_only_here, monkeypatch):
    """A writer killed between its renames leaves a journal that only a process able to write
    completes. A reader without the lock said "run fedprefix store reset-rollback", which would
    have re-keyed the user for nothing; now it says what is unfinished, and a writable load completes it."""
    writer = textwrap.dedent(
        f"""
        import os
        from fedprefix.common.store import PrefixStore, locking
        from tests.common.test_store_hardening import RAW, make_prefix
        real, done = os.replace, []
        def killed_after(src, dst):
            if len(done) == 2:  # the journal's rename, then the personal part's
                os._exit(9)  # no cleanup runs, as under SIGKILL
            done.append(dst)
            real(src, dst)
        locking.os.replace = killed_after
        PrefixStore({str(store.root)!r}, scrypt_n=2**10).save_parts(
            "alice", {{"personal": make_prefix(3), "shared": make_prefix(4)}}, RAW
        )
        """
    )
    done = subprocess.run([sys.executable, "-c", writer], cwd=ROOT, check=False)
    assert done.returncode == 9 and (store.root / ".alice.journal").exists()
    monkeypatch.setattr(user_locks, "LOCKLESS_RETRY_S", 0.2)  # a live writer would have finished by then
    for read in (store.load_parts, store.load):
        with pytest.raises(StoreBusyError, match=r"'alice': a write of it is unfinished .*\.alice\.journal") as caught:
            read("alice", RAW)
        assert "reset-rollback" not in str(caught.value)
    read_only_here[0] = True  # where the store can be written, the next load completes the write
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(3)) and same(parts["shared"], make_prefix(4))


def test_a_lock_file_of_another_user_is_named(store, monkeypatch):
    """A store command run as another user (root) left its lock file, which the owner cannot
    open: the save's error says whose it is and what to do (it said "the filesystem failed")."""
    lock = store.root / "alice.lock"
    lock.touch()
    monkeypatch.setattr(store_locking.os, "geteuid", lambda: os.stat(lock).st_uid + 1)

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(lock))

    monkeypatch.setattr(store_locking.FileLock, "acquire", refused)
    with pytest.raises(StoreIOError) as caught:
        store.save("alice", make_prefix(3), RAW)
    assert str(caught.value) == (
        f"prefix of user 'alice': its lock file alice.lock belongs to another user (uid {os.stat(lock).st_uid}) "
        "and cannot be opened: remove it (it holds no data), or run as that user"
    )
    assert caught.value.errno == errno.EACCES
    assert same(store.load("alice", RAW), make_prefix(1))  # readers go on without the lock


def test_a_lock_file_is_the_owners_under_any_umask(tmp_path):
    old = os.umask(0)
    try:
        store = PrefixStore(tmp_path / "store", scrypt_n=2**10)
        store.save("alice", make_prefix(1), RAW)
    finally:
        os.umask(old)
    assert (store.root / "alice.lock").stat().st_mode & 0o777 == 0o600  # was 0666
