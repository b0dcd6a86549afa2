"""The filesystem failing under the store (a full disk, a read-only folder, a disk error): a
StoreError that names the user and the file, still an OSError, and nothing stored changed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fedprefix.common import files as common_files
from fedprefix.common.store import PrefixStore, StoreError, StoreIOError
from fedprefix.common.store import locking as store_locking

from tests.common.test_store_hardening import RAW, files, make_prefix, same


def os_error(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), filename) if filename else OSError(code, os.strerror(code))


@pytest.fixture
def store(tmp_path) -> PrefixStore:
    store = PrefixStore(tmp_path / "store", scrypt_n=2**10)
    store.save_parts("alice", {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    return store


def test_a_full_disk_fails_a_save_naming_the_user_and_changes_nothing(store, monkeypatch):
    before = files(store.root)

    def full(fd):
        raise os_error(errno.ENOSPC)

    monkeypatch.setattr(common_files.os, "fsync", full)  # where a full disk or a lost write shows
    with pytest.raises(StoreIOError) as caught:
        store.save_parts("alice", {"personal": make_prefix(3), "shared": make_prefix(4)}, RAW)
    error = caught.value
    assert isinstance(error, StoreError) and isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert error.reason == "io_error" and error.user_id == "alice"
    assert str(error) == "prefix of user 'alice': the filesystem failed: No space left on device"
    monkeypatch.undo()
    assert files(store.root) == before  # no temp file left, no part or record changed
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(1)) and same(parts["shared"], make_prefix(2))


def test_a_save_that_drops_a_part_and_fails_to_rename_keeps_every_part(store, monkeypatch):
    """The dropped part was removed before the renames: a rename that then failed left the old
    personal file beside no shared part, a user nobody could load."""
    before, real, failed = files(store.root), os.replace, []

    def broken(src, dst):  # the first rename of a new file fails; setting aside and putting back work
        if str(src).endswith(".tmp") and not failed:
            failed.append(src)
            raise os_error(errno.EIO)
        real(src, dst)

    monkeypatch.setattr(store_locking.os, "replace", broken)
    with pytest.raises(StoreIOError):
        store.save_parts("alice", {"personal": make_prefix(3)}, RAW, drop=("shared",))
    monkeypatch.undo()
    assert failed and files(store.root) == before
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(1)) and same(parts["shared"], make_prefix(2))
    store.save_parts("alice", {"personal": make_prefix(3)}, RAW, drop=("shared",))  # and when it works
    assert list(store.load_parts("alice", RAW)) == ["personal"]


@pytest.mark.parametrize("renames", [0, 1, 2])
def test_a_writer_killed_during_a_save_that_drops_a_part_leaves_the_new_state(store, renames):
    """A writer killed after deciding a save that drops the shared part, before or between its
    renames: the next load completes it. Before, a dropped part left in place was a part the new
    personal file did not list, so loads were refused, and reset-rollback brought the dropped
    part back in front of the copy that replaced it."""
    writer = textwrap.dedent(
        f"""
        import os
        from fedprefix.common.store import PrefixStore, locking
        from tests.common.test_store_hardening import RAW, make_prefix
        real, done = os.replace, []
        def killed_after(src, dst):
            if len(done) == {renames} + 1:  # the journal's rename, then {renames} of the write's
                os._exit(9)  # no cleanup runs, as under SIGKILL
            done.append(dst)
            real(src, dst)
        locking.os.replace = killed_after
        PrefixStore({str(store.root)!r}, scrypt_n=2**10).save_parts(
            "alice", {{"personal": make_prefix(3)}}, RAW, drop=("shared",)
        )
        """
    )
    done = subprocess.run([sys.executable, "-c", writer], cwd=Path(__file__).parents[2], check=False)
    assert done.returncode == 9 and (store.root / ".alice.journal").exists()
    parts = store.load_parts("alice", RAW)
    assert list(parts) == ["personal"] and same(parts["personal"], make_prefix(3))
    assert not (store.root / ".alice.journal").exists() and not list(store.root.rglob("*.tmp"))


def test_a_journal_in_the_layout_of_two_development_versions_is_completed(store):
    """c0a99a1 and ac5dd2a wrote a format-2 journal as names plus a list of digests: taken for
    another program's, it was removed with the write's staged files, and the decided save lost."""
    import json

    writer = textwrap.dedent(
        f"""
        import os
        from fedprefix.common.store import PrefixStore, locking
        from tests.common.test_store_hardening import RAW, make_prefix
        real = os.replace
        def killed_at_first_part(src, dst):
            if str(dst).endswith(".fpx"):
                os._exit(9)  # the journal is in: the write is decided
            real(src, dst)
        locking.os.replace = killed_at_first_part
        PrefixStore({str(store.root)!r}, scrypt_n=2**10).save_parts(
            "alice", {{"personal": make_prefix(3), "shared": make_prefix(4)}}, RAW
        )
        """
    )
    done = subprocess.run([sys.executable, "-c", writer], cwd=Path(__file__).parents[2], check=False)
    journal = store.root / ".alice.journal"
    assert done.returncode == 9 and journal.exists()
    plan = json.loads(journal.read_text())
    old_layout = {
        "format_version": 2,
        "write": [entry[0] for entry in plan["write"]],
        "remove": [entry[0] for entry in plan["remove"]],
        "sha256": [entry[1] for entry in plan["write"]],
    }
    journal.write_text(json.dumps(old_layout))
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(3)) and same(parts["shared"], make_prefix(4))
    assert not journal.exists()


def test_a_read_only_store_fails_a_save_naming_the_file_and_still_loads(store, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise os_error(errno.EROFS, self.lock_file)

    monkeypatch.setattr(store_locking.FileLock, "acquire", read_only)
    with pytest.raises(StoreIOError) as caught:
        store.save("alice", make_prefix(3), RAW)
    lock = store.root / "alice.lock"
    assert str(caught.value) == f"prefix of user 'alice': the filesystem failed at {lock}: Read-only file system"
    assert same(store.load("alice", RAW), make_prefix(1))  # readers go on without the lock
    with pytest.raises(StoreIOError, match="'alice'.*Read-only"):
        store.delete("alice")


def test_a_disk_error_while_reading_names_the_user(store, monkeypatch):
    real_open = common_files.os.open

    def disk_error(path, *args, **kwargs):
        if str(path).endswith("alice.fpx"):
            raise os_error(errno.EIO, str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(common_files.os, "open", disk_error)
    reads = (lambda: store.load("alice", RAW), lambda: store.verify_user("alice", RAW), lambda: store.info("alice"))
    for read in reads:
        with pytest.raises(StoreIOError, match=r"^prefix of user 'alice': alice.fpx cannot be read \(Input/output"):
            read()
    assert "alice.fpx cannot be read" in {info.user_id: info.problem for info in store.list()}["alice"]


def test_a_store_folder_that_cannot_be_made(tmp_path, monkeypatch):
    target = tmp_path / "no" / "store"

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(type(target), "mkdir", denied)
    with pytest.raises(StoreIOError, match=rf"^prefix store: the filesystem failed at {target}: Permission denied$"):
        PrefixStore(target)


def test_a_store_io_error_keeps_its_user_and_errno_when_pickled():
    """As Ray and multiprocessing send it between processes."""
    import pickle

    error = StoreIOError.of("alice", os_error(errno.ENOSPC, "/s/alice.fpx"))
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.user_id, copy.errno) == (str(error), "alice", errno.ENOSPC)
    assert isinstance(copy, OSError) and copy.reason == "io_error"


@pytest.mark.parametrize("kind", [BlockingIOError, ChildProcessError, TimeoutError])
def test_oserrors_that_are_not_about_files_pass_through(store, monkeypatch, kind):
    def not_a_file_error(fd):
        raise kind(errno.EAGAIN, "not about files")

    monkeypatch.setattr(common_files.os, "fsync", not_a_file_error)
    with pytest.raises(kind) as caught:
        store.save("alice", make_prefix(3), RAW)
    assert not isinstance(caught.value, StoreError)
