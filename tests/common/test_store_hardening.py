"""Store against hostile folders and callers (issue 14): rollback records, races, names, all-or-nothing saves."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch
from fedprefix.common.prefix import Prefix, PrefixConfig, PrefixSpec
from fedprefix.common.protocol import shared_store_id
from fedprefix.common.store import (
    BadKeyError,
    BadUserIdError,
    NonFiniteError,
    PrefixStore,
    RollbackError,
    RollbackStateError,
    StoreError,
    StoreIOError,
    UnknownUserError,
    WrongKeyError,
)
from fedprefix.common.store import locking as store_locking
from typer.testing import CliRunner

FP = "ab" * 32
SPEC = PrefixSpec(num_layers=2, num_kv_heads=2, head_dim=4, num_virtual_tokens=3)
RAW = bytes(range(32))
RAW2 = bytes(range(1, 33))
PASS = "correct horse battery staple"


def make_prefix(seed: int = 0) -> Prefix:
    config = PrefixConfig(spec=SPEC, base_fingerprint=FP)
    return Prefix(config, init="random", generator=torch.Generator().manual_seed(seed))


def same(a: Prefix, b: Prefix) -> bool:
    ta, tb = a.state_tensors(), b.state_tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def store(tmp_path) -> PrefixStore:
    return PrefixStore(tmp_path / "store", scrypt_n=2**10)


def record(store: PrefixStore, name: str):
    return store.root / ".rollback" / f"{name}.json"


# ------------------------------------------------------------------ rollback records


def test_older_file_put_back_and_record_deleted_is_refused(store):
    store.save("alice", make_prefix(1), PASS)
    old = store.path_for("alice").read_bytes()
    store.save("alice", make_prefix(2), PASS)
    store.path_for("alice").write_bytes(old)
    record(store, "alice").unlink()
    (store.root / ".counters.json").unlink(missing_ok=True)  # the old state file means nothing now
    for call in (lambda: store.load("alice", PASS), lambda: PrefixStore(store.root).verify("alice", PASS)):
        with pytest.raises(RollbackStateError, match="alice.*missing.*reset-rollback alice"):
            call()


def test_a_store_from_before_rollback_records_says_so_and_reset_rollback_lets_it_load(store):
    """Such a store (.counters.json, no records) had been refused as if its records were deleted."""
    store.save("alice", make_prefix(1), PASS)
    shutil.rmtree(store.root / ".rollback")
    (store.root / ".counters.json").write_text('{"alice": 1}')
    with pytest.raises(RollbackStateError, match="missing \\(this store began under a fedprefix older than rollback"):
        store.load("alice", PASS)
    store.reset_rollback("alice", PASS)
    assert same(store.load("alice", PASS), make_prefix(1))


def test_replaced_older_file_or_foreign_record_is_refused(store):
    store.save("alice", make_prefix(1), PASS)
    old_file, old_record = store.path_for("alice").read_bytes(), record(store, "alice").read_bytes()
    store.save("alice", make_prefix(2), PASS)
    store.save("bob", make_prefix(3), PASS)
    store.path_for("alice").write_bytes(old_file)
    with pytest.raises(RollbackError, match="older copy"):
        store.load("alice", PASS)
    # Another user's record (or an edited one) cannot stand in for alice's.
    shutil.copy(record(store, "bob"), record(store, "alice"))
    with pytest.raises(RollbackStateError, match="damaged or not made with this data key"):
        store.load("alice", PASS)
    forged = old_record.replace(b'"counter":1', b'"counter":0')
    record(store, "alice").write_bytes(forged)
    with pytest.raises(RollbackStateError):
        store.load("alice", PASS)
    # Documented limit: old copies of BOTH the file and its record put back together pass.
    record(store, "alice").write_bytes(old_record)
    assert same(store.load("alice", PASS), make_prefix(1))


def test_file_from_before_rotate_or_delete_is_refused(store):
    store.save("alice", make_prefix(1), RAW)
    old = store.path_for("alice").read_bytes()
    store.rotate_data_key("alice", RAW)
    store.path_for("alice").write_bytes(old)
    with pytest.raises(RollbackError, match="data key"):
        store.load("alice", RAW)
    store.delete("alice")
    store.save("alice", make_prefix(2), RAW)  # a new start: counter 1 again, new data key
    store.path_for("alice").write_bytes(old)
    with pytest.raises(RollbackError):
        store.load("alice", RAW)


def test_a_save_never_continues_from_an_older_copy_or_a_retired_data_key(store):
    """A save checks the file it continues from as a load does. Before, with the record deleted
    (or naming another data key) it continued: from an older copy put back (counter 5, so a
    newer copy kept by someone was accepted after the save), or with a retired, leaked data key
    (a copy from between change_passphrase and rotate_data_key put back)."""
    for n in range(1, 11):
        store.save("alice", make_prefix(n), PASS)
        if n == 5:
            fifth = store.path_for("alice").read_bytes()
    store.path_for("alice").write_bytes(fifth)
    record(store, "alice").unlink()
    with pytest.raises(RollbackStateError, match="missing.*reset-rollback alice"):
        store.save("alice", make_prefix(11), PASS)

    store.save("bob", make_prefix(1), PASS)
    store.change_passphrase("bob", PASS, "new passphrase")
    between = store.path_for("bob").read_bytes()  # the old data key, wrapped under the new passphrase
    store.rotate_data_key("bob", "new passphrase")
    store.path_for("bob").write_bytes(between)
    with pytest.raises(RollbackError, match="data key"):
        store.save("bob", make_prefix(2), "new passphrase")


def test_after_reset_rollback_no_copy_from_before_it_is_accepted(store):
    """Reset re-encrypts under a new data key: re-anchored at an older copy put back (counter 5),
    a newer copy kept from before (counter 10) would otherwise pass."""
    for n in range(1, 11):
        store.save("alice", make_prefix(n), PASS)
        if n == 5:
            fifth = store.path_for("alice").read_bytes()
    tenth = store.path_for("alice").read_bytes()
    store.path_for("alice").write_bytes(fifth)
    record(store, "alice").unlink()
    store.reset_rollback("alice", PASS)
    assert same(store.load("alice", PASS), make_prefix(5))
    for copy in (tenth, fifth):
        store.path_for("alice").write_bytes(copy)
        with pytest.raises(RollbackError):
            store.load("alice", PASS)


def test_a_passphrase_that_is_not_unicode_text_is_refused_naming_it(store):
    with pytest.raises(BadKeyError, match="alice.*not valid Unicode") as caught:
        store.save("alice", make_prefix(1), "pa\udcffss")
    assert "udcff" not in str(caught.value) and "\udcff" not in str(caught.value)


def test_reset_rollback_needs_the_key(store):
    store.save("alice", make_prefix(1), PASS, part="shared")
    store.save("alice", make_prefix(2), PASS)
    record(store, "alice").unlink()
    record(store, shared_store_id("alice")).write_text("garbage")
    with pytest.raises(WrongKeyError):
        store.reset_rollback("alice", "not the passphrase")
    with pytest.raises(RollbackStateError):
        store.load("alice", PASS)
    infos = store.reset_rollback("alice", PASS)
    assert sorted(i.user_id for i in infos) == ["alice", "alice@shared"]
    parts = store.load_parts("alice", PASS, FP)
    assert same(parts["personal"], make_prefix(2)) and same(parts["shared"], make_prefix(1))


def test_cli_reset_rollback(store):
    from fedprefix.coordinator.cli.store import store_app

    store.save("alice", make_prefix(1), PASS)
    record(store, "alice").unlink()
    runner = CliRunner()
    args = ["--store", str(store.root), "--passphrase-env", "FP_PASS"]
    result = runner.invoke(store_app, ["verify", "alice", *args], env={"FP_PASS": PASS})
    assert result.exit_code == 1 and "reset-rollback" in result.stderr
    result = runner.invoke(store_app, ["reset-rollback", "alice", *args], env={"FP_PASS": "wrong"})
    assert result.exit_code == 1 and "wrong key" in result.stderr
    assert not record(store, "alice").exists()
    result = runner.invoke(store_app, ["reset-rollback", "nobody", *args], env={"FP_PASS": PASS})
    assert result.exit_code == 1
    result = runner.invoke(store_app, ["reset-rollback", "alice", *args], env={"FP_PASS": PASS})
    assert result.exit_code == 0, result.output
    result = runner.invoke(store_app, ["verify", "alice", *args], env={"FP_PASS": PASS})
    assert result.exit_code == 0, result.output
    assert same(store.load("alice", PASS), make_prefix(1))


# ------------------------------------------------------------------ races


def test_loads_during_saves_see_old_or_new_never_an_error(store):
    known = [make_prefix(s) for s in range(4)]
    store.save("alice", known[0], PASS)
    store.save("alice", known[0], PASS, part="shared")
    errors: list[BaseException] = []
    done = threading.Event()
    loads = [0]

    def writer() -> None:
        try:  # at least 40 saves, and on until readers have raced 20 of them (at most 20 s)
            deadline, i = time.monotonic() + 20, 0
            while i < 40 or (loads[0] < 20 and time.monotonic() < deadline):
                p, i = known[i % 4], i + 1
                store.save_parts("alice", {"personal": p, "shared": p}, PASS)
                store.rotate_data_key("alice", PASS) if i % 10 == 0 else None
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            done.set()

    def reader(reader_store: PrefixStore) -> None:
        while not done.is_set():
            try:
                loaded = reader_store.load("alice", PASS, FP)
                assert any(same(loaded, k) for k in known)
                parts = reader_store.load_parts("alice", PASS, FP)
                assert same(parts["personal"], parts["shared"])  # read together: one save, whole
                loads[0] += not done.is_set()  # only loads that raced a save count
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader, args=(PrefixStore(store.root),)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and loads[0] > 0


# ------------------------------------------------------------------ names


def test_user_id_at_shared_cannot_block_dave(store):
    for bad in ("dave@shared", "dave@SHARED", "dave@shared@shared"):
        with pytest.raises(BadUserIdError, match="reserved"):
            store.save(bad, make_prefix(), b"\x07" * 32)
        with pytest.raises(BadUserIdError):
            shared_store_id(bad)
    assert list(store.root.iterdir()) == []
    store.save_parts("dave", {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    assert same(store.load("dave", RAW), make_prefix(1))
    assert same(store.load(shared_store_id("dave"), RAW), make_prefix(2))
    assert [i.user_id for i in store.list()] == ["dave", "dave@shared"]


def test_id_length_checked_once_for_every_derived_name(store):
    longest = "x" * 128
    store.save_parts(longest, {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    assert same(store.load_parts(longest, RAW)["shared"], make_prefix(2))
    with pytest.raises(BadUserIdError, match="1-128"):
        store.save_parts("x" * 129, {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    assert sorted(p.name for p in store.root.glob("*.fpx")) == [f"{longest}.fpx", f"{longest}@shared.fpx"]


# ------------------------------------------------------------------ all or nothing, finite only


def test_failed_second_part_leaves_first_unchanged(store, monkeypatch):
    store.save("dave", make_prefix(1), RAW)
    before = files(store.root)
    with pytest.raises(WrongKeyError):  # every part of a user is under one key
        store.save_parts("dave", {"personal": make_prefix(2), "shared": make_prefix(3)}, RAW2)
    nan = make_prefix(3)
    with torch.no_grad():
        next(iter(nan.parameters())).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError):
        store.save_parts("dave", {"personal": make_prefix(2), "shared": nan}, RAW)
    assert files(store.root) == before
    calls = []

    def failing_stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second part's file cannot be written
            raise OSError(28, "No space left on device")
        return real_stage(*args, **kwargs)

    real_stage = store_locking.write_temp
    monkeypatch.setattr(store_locking, "write_temp", failing_stage)
    with pytest.raises(OSError, match="No space"):
        store.save_parts("dave", {"personal": make_prefix(2), "shared": make_prefix(3)}, RAW)
    assert files(store.root) == before  # no temp file left, nothing renamed
    assert same(store.load("dave", RAW), make_prefix(1))


def test_a_part_dropped_in_the_same_step_only_once_the_new_one_is_staged(store, monkeypatch):
    """save_parts(drop=...): a personal copy that replaces the shared part. A save that fails
    (wrong key, a full disk) keeps the shared part; one that succeeds leaves the new part only."""
    store.save_parts("dave", {"personal": make_prefix(1), "shared": make_prefix(9)}, RAW)
    with pytest.raises(WrongKeyError):
        store.save_parts("dave", {"personal": make_prefix(2)}, RAW2, drop=("shared",))
    real_stage = store_locking.write_temp

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_locking, "write_temp", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.save_parts("dave", {"personal": make_prefix(2)}, RAW, drop=("shared",))
    assert same(store.load(shared_store_id("dave"), RAW), make_prefix(9)) and same(
        store.load("dave", RAW), make_prefix(1)
    )
    monkeypatch.setattr(store_locking, "write_temp", real_stage)
    store.save_parts("dave", {"personal": make_prefix(2)}, RAW, drop=("shared",))
    assert store.load_parts("dave", RAW).keys() == {"personal"}
    store.save_parts("dave", {"personal": make_prefix(3)}, RAW, drop=("shared",))  # nothing left to drop
    assert same(store.load("dave", RAW), make_prefix(3))


def test_ctrl_c_between_the_renames_of_a_two_part_save_waits_for_the_last_one(store, monkeypatch):
    """Ctrl-C (and SIGTERM) landing after the first rename used to stop the save there: the new
    personal part beside the old shared one, which loads joined. Now the interrupt is raised
    once every file is renamed."""
    store.save_parts("dave", {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    real_replace, renames = store_locking.os.replace, []
    # a terminal's Ctrl-C (a suite started as a background job inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupted_replace(src, dst):
        real_replace(src, dst)
        renames.append(dst)
        if len(renames) == 2:  # after the journal's rename and the first part's
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(store_locking.os, "replace", interrupted_replace)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.save_parts("dave", {"personal": make_prefix(3), "shared": make_prefix(4)}, RAW)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(renames) == 5  # the journal, two parts and their two rollback records
    monkeypatch.setattr(store_locking.os, "replace", real_replace)
    parts = store.load_parts("dave", RAW)
    assert same(parts["personal"], make_prefix(3)) and same(parts["shared"], make_prefix(4))


@pytest.mark.parametrize("failing", ["once", "always", "sync", "sync-after"])
def test_a_filesystem_error_during_or_after_the_renames_says_what_the_write_left(store, monkeypatch, failing):
    """A rename failed once then made is a save that worked. One that keeps failing, or a folder
    sync after the renames, is an error saying that the write is decided and completes at the
    user's next load or save, which it then does (it said "changed nothing" while the new parts
    were in, and later left part new and part old); a sync that fails before the write is
    decided (its journal's) changes nothing."""
    store.save_parts("dave", {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)
    real_replace, real_sync, renames = store_locking.os.replace, store_locking.fsync_dir, []

    def flaky_replace(src, dst):
        renames.append(dst)  # the journal's first, then the parts' and records'
        if len(renames) == 3 or (failing == "always" and len(renames) > 3):
            raise OSError(5, "Input/output error", str(dst))
        real_replace(src, dst)

    def failing_sync(folder):
        renamed = (store.root / ".dave.journal").exists() and not list(store.root.rglob("*.staged.tmp"))
        if failing == "sync" or renamed:  # any (the first comes before the write is decided), or those after it
            raise OSError(5, "Input/output error", str(folder))
        real_sync(folder)

    if failing.startswith("sync"):
        monkeypatch.setattr(store_locking, "fsync_dir", failing_sync)
    else:
        monkeypatch.setattr(store_locking.os, "replace", flaky_replace)
    new = {"personal": make_prefix(3), "shared": make_prefix(4)}
    if failing == "once":
        store.save_parts("dave", new, RAW)
    else:
        said = {
            "sync": "Input/output error$",
            "always": "decided but not all in place: the user's next load or save completes it",
            "sync-after": "in place but not yet durable: the user's next load or save completes it",
        }[failing]
        with pytest.raises(StoreIOError, match=f"prefix of user 'dave': the filesystem failed at .*{said}"):
            store.save_parts("dave", new, RAW)
    monkeypatch.undo()
    parts = store.load_parts("dave", RAW)
    kept = (1, 2) if failing == "sync" else (3, 4)
    assert same(parts["personal"], make_prefix(kept[0])) and same(parts["shared"], make_prefix(kept[1]))
    assert not [f for f in files(store.root) if f.endswith((".tmp", ".journal"))]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e6])
def test_non_finite_refused(store, value):
    prefix = make_prefix()
    with torch.no_grad():
        next(iter(prefix.parameters())).view(-1)[3] = value
    dtype = torch.float16 if value == 1e6 else torch.float32  # 1e6 overflows float16 to inf
    with pytest.raises(NonFiniteError, match="alice.*NaN or Inf.*nothing was saved"):
        store.save("alice", prefix, RAW, dtype=dtype)
    assert not store.exists("alice") and not list(store.root.rglob("*.tmp"))


def test_a_fifo_a_device_or_a_folder_in_place_of_a_file_is_refused_not_waited_on(store):
    """A FIFO would block every reader (and a save holding the user's lock); a link to /dev/zero
    would be read forever. Each is refused as not a regular file, and listing goes on."""
    import os

    from fedprefix.common.store import CorruptError

    store.save("alice", make_prefix(), RAW)
    store.save_parts("jack", {"personal": make_prefix(1)}, RAW)
    os.mkfifo(store.path_for("kate"))
    os.mkfifo(store.path_for("jack@shared"))
    os.symlink("/dev/zero", store.path_for("zed"))
    store.path_for("lily").mkdir()
    store.save("mona", make_prefix(2), RAW)
    record(store, "mona").unlink()
    os.mkfifo(record(store, "mona"))  # a FIFO where the rollback record was
    os.symlink(store.root / "nowhere", store.path_for("nina"))
    done = []

    def work():
        for name in ("kate", "zed", "lily"):
            with pytest.raises(CorruptError, match="not a regular file"):
                store.verify(name, RAW)
        with pytest.raises(RollbackStateError, match="rollback record mona.json is not a regular file"):
            store.load("mona", RAW)
        with pytest.raises(CorruptError, match="a link to nothing"):  # not "no prefix is stored"
            store.load("nina", RAW)
        with pytest.raises(CorruptError, match="not a regular file"):  # never skipped as if not stored
            store.load_parts("jack", RAW)
        listed = {info.user_id: info.problem for info in store.list()}
        assert listed["alice"] is None and all("not a regular file" in listed[n] for n in ("kate", "zed", "lily"))
        done.append(True)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done == [True], "a reader hung on a FIFO or a device"


def test_a_read_only_store_still_loads_every_part(store, monkeypatch):
    """load_parts takes the user's lock when it can; on a read-only mount it cannot create the
    lock file: it reads without it (a save still fails; test_store_read_only: writers elsewhere)."""
    import errno

    from fedprefix.common.store import user_locks

    shared, personal = make_prefix(1), make_prefix(2)
    store.save_parts("gina", {"personal": personal, "shared": shared}, RAW)
    older = store.path_for("gina").read_bytes()
    store.save_parts("gina", {"personal": personal, "shared": shared}, RAW)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(user_locks, "file_lock", read_only)
    monkeypatch.setattr(user_locks, "LOCKLESS_RETRY_S", 60.0)  # files that do not change are not read again
    parts = store.load_parts("gina", RAW)
    assert same(parts["personal"], personal) and same(parts["shared"], shared)
    with pytest.raises(OSError, match="Read-only"):
        store.save_parts("gina", {"personal": personal}, RAW)
    store.path_for("gina").write_bytes(older)  # an older copy put back: still a rollback, not an OSError
    started = time.monotonic()
    with pytest.raises(RollbackError):
        store.load_parts("gina", RAW)
    with pytest.raises(RollbackError):
        store.load("gina", RAW)
    assert time.monotonic() - started < 10  # at once: a server on a read-only mount spent 2 s per request


def test_odd_files_in_the_folder_are_store_errors_naming_them(store):
    """A link loop or folder where a lock, a record or a prefix goes, or `.rollback` as a file:
    each a StoreError naming the file (they were raw OSErrors); `list` reports such a file as
    a problem and lists the others (one unreadable file failed the whole listing)."""
    store.save("alice", make_prefix(1), PASS)
    store.save("bob", make_prefix(2), PASS)
    lock = store.root / "bob.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to("bob.lock")  # a loop
    with pytest.raises(StoreError, match="bob.lock cannot be used"):
        store.save("bob", make_prefix(3), PASS)
    lock.unlink()
    lock.mkdir()
    with pytest.raises(StoreError, match="bob.lock cannot be used"):
        store.load_parts("bob", PASS)
    lock.rmdir()
    loop = store.root / "carl.fpx"
    loop.symlink_to("carl.fpx")
    listed = {info.user_id: info.problem for info in store.list()}
    assert listed["alice"] is None and listed["bob"] is None and "carl.fpx cannot be read" in listed["carl"]
    shutil.rmtree(store.root / ".rollback")
    (store.root / ".rollback").write_text("not a folder")
    with pytest.raises(StoreError, match="alice.json cannot be read"):
        store.load("alice", PASS)


def test_readers_of_an_unknown_user_leave_no_lock_file(store):
    """A server asked for made-up user ids made a lock file for each (and `store verify` for a typo)."""
    from fedprefix.coordinator.cli.store import store_app

    store.save("alice", make_prefix(), RAW)
    before = files(store.root)
    for read in (store.load_parts, store.verify_user):
        with pytest.raises(UnknownUserError, match="no prefix is stored for this user"):
            read("mallory", RAW)
    result = CliRunner().invoke(store_app, ["verify", "mallory", "--store", str(store.root)], input="pass\n")
    assert result.exit_code == 1 and "no prefix is stored" in result.output, result.output
    assert files(store.root) == before and not (store.root / "mallory.lock").exists()
    assert same(store.load_parts("alice", RAW)["personal"], make_prefix())  # a known user's reads are as before
    # ... nor do the changes that need a stored user (a delete, a key change)
    for change in (store.delete, lambda u: store.rotate_data_key(u, RAW), lambda u: store.reset_rollback(u, RAW)):
        with pytest.raises(UnknownUserError, match="no prefix is stored for this user"):
            change("mallory")
    with pytest.raises(UnknownUserError):
        store.change_passphrase("mallory", RAW, PASS)
    assert files(store.root) == before


def test_store_settings_and_a_blank_path_are_refused_when_the_store_is_made(tmp_path, monkeypatch):
    """Refused at construction, not at the first save after training: a lock timeout filelock
    would reject then (or take as "wait forever": a negative one), a durable flag "no" taken as
    true, and a blank path, which Path("") makes the current folder."""
    from fedprefix.common.errors import ConfigError
    from fedprefix.common.store import existing_store_folder

    for bad in ("5", float("nan"), float("inf"), -5, True, None):
        with pytest.raises(ConfigError, match="lock_timeout must be a finite number of seconds"):
            PrefixStore(tmp_path / "s", lock_timeout=bad)
    with pytest.raises(ConfigError, match="durable must be True or False"):
        PrefixStore(tmp_path / "s", durable="no")
    monkeypatch.chdir(tmp_path)
    for blank in ("", "  "):
        with pytest.raises(ConfigError, match="the store folder's path is empty"):
            PrefixStore(blank)
        with pytest.raises(ConfigError, match="the store folder's path is empty"):
            existing_store_folder(blank)
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []
    store = PrefixStore(tmp_path / "s", lock_timeout=0)
    store.save("alice", make_prefix(), RAW)
    with pytest.raises(ConfigError, match="base_fingerprint must be a base's fingerprint"):
        store.load("alice", RAW, base_fingerprint=123)
