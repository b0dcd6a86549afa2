"""A writer killed outright (SIGKILL, as a power loss or the OOM killer would) at every
filesystem call of every kind of store write: the user's files are then the old version or
the new one, whole, never a mix, and the next save works and leaves no temp file.

Before writes were journalled (locking.py), a kill between the renames of a two-part save, a
first save, or a rotate-key left the user unloadable until reset-rollback, which kept the
mix (an audit that killed writers the same way found it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from fedprefix.common.store import PrefixStore, StoreError, StoreIOError, UnknownUserError, UnknownVersionError

from tests.common.test_store_hardening import PASS, RAW, make_prefix, same

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks a writer to kill it")

CALLS = ("replace", "rename", "unlink", "fsync", "open", "mkdir")  # where a writer can be killed
ONE, TWO = {"personal": 1}, {"personal": 1, "shared": 10}

# op -> (stored before, the op, stored after, the key after); values are make_prefix seeds
OPS = {
    "first save": (None, lambda s: s.save("u", make_prefix(2), RAW), {"personal": 2}, RAW),
    "two-part save": (
        TWO,
        lambda s: s.save_parts("u", {"personal": make_prefix(2), "shared": make_prefix(20)}, RAW),
        {"personal": 2, "shared": 20},
        RAW,
    ),
    "save dropping a part": (
        TWO,
        lambda s: s.save_parts("u", {"personal": make_prefix(2)}, RAW, drop=["shared"]),
        {"personal": 2},
        RAW,
    ),
    "part added": (
        ONE,
        lambda s: s.save_parts("u", {"shared": make_prefix(20)}, RAW),
        {"personal": 1, "shared": 20},
        RAW,
    ),
    "passphrase change": (TWO, lambda s: s.change_passphrase("u", RAW, PASS), TWO, PASS),
    "rotate-key": (TWO, lambda s: s.rotate_data_key("u", RAW), TWO, RAW),
    "reset-rollback": (TWO, lambda s: s.reset_rollback("u", RAW), TWO, RAW),
    "delete": (TWO, lambda s: s.delete("u"), None, RAW),
}


def stored(store: PrefixStore, key) -> dict[str, int] | None:
    """{part: seed} of what `key` loads (None: no user), matched against the seeds used here."""
    try:
        parts = store.load_parts("u", key)
    except UnknownUserError:
        return None
    return {
        part: next(seed for seed in (1, 2, 10, 20) if same(prefix, make_prefix(seed))) for part, prefix in parts.items()
    }


def killed_at(call: int, root, op) -> bool:
    """Run `op` on the store at `root` in a child killed at its `call`-th filesystem call; False
    if it finished first."""
    pid = os.fork()
    if pid == 0:  # the child: count the calls, and die at the chosen one
        try:
            calls = [0]
            for name in CALLS:
                real = getattr(os, name)

                def counted(*args, _real=real, **kwargs):
                    calls[0] += 1
                    if calls[0] == call:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*args, **kwargs)

                setattr(os, name, counted)
            op(PrefixStore(root, scrypt_n=2**10))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


@pytest.mark.parametrize("name", list(OPS))
def test_a_writer_killed_anywhere_leaves_the_old_version_or_the_new_one(tmp_path, name):
    before, op, after, key_after = OPS[name]
    template = tmp_path / "template"
    store = PrefixStore(template, scrypt_n=2**10)
    if before:
        store.save_parts("u", {part: make_prefix(seed) for part, seed in before.items()}, RAW)
    call, seen = 0, set()
    while True:
        call += 1
        root = tmp_path / f"kill-{call}"
        shutil.copytree(template, root)
        killed = killed_at(call, root, op)
        store = PrefixStore(root, scrypt_n=2**10)
        key = key_after
        try:
            state = stored(store, key)
        except StoreError:  # not under the new key: the change was not made (a passphrase change)
            key = RAW
            state = stored(store, key)
        assert state in (before, after), f"killed at call {call}: stored {state}, neither {before} nor {after}"
        seen.add((key, state == after))
        store.save("u", make_prefix(3), key)  # the next save works
        leftovers = [p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".journal"))]
        assert not leftovers, f"killed at call {call}: left {leftovers}"
        if not killed:
            break
    assert len(seen) == 2 or name in ("rotate-key", "reset-rollback")  # both ends were reached
    if name in ("rotate-key", "reset-rollback"):  # values alike before and after: the data key tells
        assert PrefixStore(root).info("u").key_id != PrefixStore(template).info("u").key_id


@pytest.fixture
def store(tmp_path) -> PrefixStore:
    store = PrefixStore(tmp_path / "store", scrypt_n=2**10)
    store.save_parts("u", {"personal": make_prefix(1), "shared": make_prefix(10)}, RAW)
    store.save("v", make_prefix(5), RAW)
    return store


@pytest.mark.parametrize("journal", [b"not json", b'{"format_version": 1}', b'{"write": "x"}', None])
def test_a_journal_this_store_did_not_write_is_removed_and_moves_nothing(store, journal):
    """Something at the journal's name that is no journal (None: a folder) is removed under the
    user's lock, and the files stay as they are (a folder had blocked every locked access)."""
    path = store.root / ".u.journal"
    if journal is None:
        (path / "inside").mkdir(parents=True)
    else:
        path.write_bytes(journal)
    parts = store.load_parts("u", RAW)
    assert same(parts["personal"], make_prefix(1)) and same(parts["shared"], make_prefix(10))
    assert not path.exists()


@pytest.mark.parametrize(
    "names",
    [
        '"remove": ["v.fpx"], "write": []',  # another user's file
        '"remove": ["../outside"], "write": []',
        '"remove": [], "write": [".rollback/v.json"]',
        '"remove": [], "write": ["U.fpx"]',  # 'U' and 'u': one journal on a case-insensitive filesystem
    ],
)
def test_a_journal_naming_another_users_files_is_refused_and_kept(store, names):
    """It moves nothing (not even outside the store), and it is kept: on a case-insensitive
    filesystem it may be another user's decided write, which removing it would lose."""
    path = store.root / ".u.journal"
    path.write_text("{" + f'"format_version": 1, {names}' + "}")
    (store.root.parent / "outside").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"its journal \.u\.journal names .*not one of its files"):
        store.load_parts("u", RAW)
    assert path.exists() and (store.root.parent / "outside").exists()
    assert same(store.load("v", RAW), make_prefix(5)) and same(store.load("u", RAW), make_prefix(1))


def test_the_staged_records_are_durable_before_the_journal_decides_on_them(store, monkeypatch):
    """A power loss could keep the journal and lose a staged rollback record whose folder had
    not been synced: recovery then put the new parts in beside the old records (a reviewer's
    finding; a killed process keeps every call it made, so the kill sweep cannot see it)."""
    from fedprefix.common.store import locking

    events, real_sync, real_replace = [], locking.fsync_dir, locking.os.replace
    monkeypatch.setattr(
        locking, "fsync_dir", lambda folder: events.append(("sync", Path(folder).name)) or real_sync(folder)
    )
    monkeypatch.setattr(
        locking.os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or real_replace(a, b)
    )
    store.rotate_data_key("u", RAW)
    decided = events.index(("rename", ".u.journal"))
    assert ("sync", ".rollback") in events[:decided], events


def test_a_journal_of_a_newer_version_is_refused_by_name(store):
    (store.root / ".u.journal").write_bytes(b'{"format_version": 3, "remove": [], "write": [], "more": 1}')
    with pytest.raises(UnknownVersionError, match=r"journal \.u\.journal is format 3, written by a newer fedprefix"):
        store.save("u", make_prefix(2), RAW)
    assert same(store.load("u", RAW), make_prefix(1))  # an unlocked load reads the files as they are


def test_a_rollback_record_of_a_newer_version_is_refused_by_name_not_called_damaged(store):
    """reset-rollback, the advice for a damaged record, would rewrite it in the older format."""
    path = store.root / ".rollback" / "u.json"
    path.write_bytes(path.read_bytes().replace(b'"format_version":1', b'"format_version":2'))
    with pytest.raises(UnknownVersionError, match="rollback record says format 2: a newer fedprefix"):
        store.load("u", RAW)


def test_a_store_folder_that_cannot_be_searched_is_an_io_error_not_an_unknown_user(store, monkeypatch):
    """os.path.lexists said False for EACCES: every user of such a folder was "not stored" (a
    server answered 404)."""

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "lstat", denied)
    with pytest.raises(StoreIOError, match="Permission denied"):
        store.load("u", RAW)


def stopped_after_its_journal(store: PrefixStore, monkeypatch) -> None:
    """A save of u dropping its shared part, stopped once decided (journal in, nothing renamed)."""
    from fedprefix.common.store import locking

    def stop(*args):
        raise SystemExit("stopped")

    with monkeypatch.context() as patch:
        patch.setattr(locking, "_finish", stop)
        with pytest.raises(SystemExit):
            store.save_parts("u", {"personal": make_prefix(5)}, RAW, drop=["shared"])
    assert (store.root / ".u.journal").exists()


@pytest.mark.parametrize("temps", ["removed", "kept"])
def test_a_journal_whose_files_were_written_again_since_is_removed_not_completed(tmp_path, monkeypatch, temps):
    """A write stopped after its journal; then a fedprefix that reads no journals (a downgrade)
    saved both parts again, removing this version's temp files (as the one before journals did)
    or leaving them (as older ones did); back on this version, completing the stale journal
    deleted that later shared part, and the user was refused (an auditor's finding)."""
    store = PrefixStore(tmp_path / "store", scrypt_n=2**10)
    store.save_parts("u", {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    later = PrefixStore(tmp_path / "later", scrypt_n=2**10)
    shutil.copytree(store.root, later.root, dirs_exist_ok=True)
    later.save_parts("u", {"personal": make_prefix(3), "shared": make_prefix(4)}, RAW)
    stopped_after_its_journal(store, monkeypatch)
    if temps == "removed":
        for tmp in store.root.rglob("*.staged.tmp"):
            tmp.unlink()
    for path in later.root.rglob("*"):  # the older version's files, the journal left as it was
        if path.is_file() and not path.name.endswith((".lock", ".journal", ".tmp")):
            shutil.copy2(path, store.root / path.relative_to(later.root))
    parts = store.load_parts("u", RAW)
    assert same(parts["personal"], make_prefix(3)) and same(parts["shared"], make_prefix(4))
    assert not (store.root / ".u.journal").exists() and not list(store.root.rglob("*.staged.tmp"))


def test_a_journal_keeps_the_keys_an_older_reader_checks_before_its_version(store, monkeypatch):
    """The version before digests read a journal with other keys as foreign and removed it,
    leaving a two-part user mixed; with the same three keys it refuses format 2 by name."""
    stopped_after_its_journal(store, monkeypatch)
    plan = json.loads((store.root / ".u.journal").read_bytes())
    assert set(plan) == {"format_version", "remove", "write"} and plan["format_version"] == 2
    assert [entry[0] for entry in plan["write"]][:1] == ["u.fpx"] and plan["remove"][0][0] == "u@shared.fpx"


def test_a_journal_of_the_format_before_digests_is_still_completed(store, monkeypatch):
    stopped_after_its_journal(store, monkeypatch)
    journal = store.root / ".u.journal"
    plan = json.loads(journal.read_bytes())
    names = {kind: [entry[0] for entry in plan[kind]] for kind in ("write", "remove")}
    journal.write_text(json.dumps({"format_version": 1, **names}))
    assert set(store.load_parts("u", RAW)) == {"personal"} and same(store.load("u", RAW), make_prefix(5))
