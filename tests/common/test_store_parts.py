"""A user's parts belong together: each file's authenticated header lists every part the user had
after that write, so a part deleted, or a dropped one put back, outside the store is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fedprefix.common.store import (
    PartsMismatchError,
    PrefixStore,
    RollbackError,
    UnknownUserError,
    WrongKeyError,
)
from fedprefix.common.store.format import NONCE_BYTES, TAG_BYTES, b64, encode_file, read_header, store_name
from fedprefix.common.store.keys import KekCache, new_dek, new_key_id, wrap_dek
from fedprefix.common.store.payload import encode_payload
from fedprefix.common.store.rollback import make_record
from fedprefix.common.store.seal import _header_mac, _payload_aad

from tests.common.test_store_hardening import PASS, RAW, RAW2, files, make_prefix, record, same


def format1_store(root: Path) -> PrefixStore:
    """A store as fedprefix wrote it before parts lists (format 1: no `parts`, no `write_id`):
    alice's personal part make_prefix(1) and shared part make_prefix(2), each under RAW, counter 1.
    Built here from the store's own primitives, sealed as seal() did in format 1."""
    store = PrefixStore(root, scrypt_n=2**10)
    for part, prefix in (("personal", make_prefix(1)), ("shared", make_prefix(2))):
        name = store_name("alice", part)
        kdf, kek = KekCache().new_kek(name, RAW, store.scrypt_n)
        dek, key_id, nonce = new_dek(), new_key_id(), os.urandom(NONCE_BYTES)
        plaintext = encode_payload(prefix, "float32", name)
        fields = {
            "format_version": 1,
            "user_id": name,
            "base_fingerprint": prefix.config.base_fingerprint,
            "prefix_config": prefix.config.model_dump(mode="json"),
            "dtype": "float32",
            "key_id": key_id,
            "payload_nonce": b64(nonce),
            "payload_length": len(plaintext) + TAG_BYTES,
            "counter": 1,
            "kdf": kdf.model_dump(mode="json"),
            "wrapped_dek": wrap_dek(name, key_id, kek, dek).model_dump(mode="json"),
        }
        ciphertext = AESGCM(dek).encrypt(nonce, plaintext, _payload_aad(fields))
        fields["header_mac"] = _header_mac(dek, fields)
        store.path_for(name).write_bytes(encode_file(fields, ciphertext))
        record(store, name).parent.mkdir(exist_ok=True)
        record(store, name).write_bytes(make_record(name, key_id, 1, dek))
    return store


@pytest.fixture
def store(tmp_path) -> PrefixStore:
    return PrefixStore(tmp_path / "store", scrypt_n=2**10)


def header(store: PrefixStore, name: str):
    return read_header(store.path_for(name), name)[0]


def both(store: PrefixStore, user: str = "alice") -> None:
    store.save_parts(user, {"personal": make_prefix(1), "shared": make_prefix(2)}, RAW)


@pytest.mark.parametrize("gone", ["alice", "alice@shared"])
def test_a_part_deleted_outside_the_store_is_refused(store, gone):
    """The user's other part was served alone: a personal prefix without the shared one it was
    trained behind, or the shared one as if it were the user's."""
    both(store)
    store.save("bob", make_prefix(3), RAW)
    store.path_for(gone).unlink()
    reads = (
        lambda: store.load_parts("alice", RAW),
        lambda: store.verify_user("alice", RAW),
        lambda: store.load("alice" if gone != "alice" else "alice@shared", RAW),
    )
    for read in reads:
        with pytest.raises(PartsMismatchError, match="written with the parts personal, shared; stored now: "):
            read()
    record(store, gone).unlink()  # its rollback record too: the other part still lists it
    with pytest.raises(PartsMismatchError):
        store.load_parts("alice", RAW)
    assert same(store.load_parts("bob", RAW)["personal"], make_prefix(3)), "other users are untouched"


def test_a_dropped_part_put_back_is_refused(store):
    both(store)
    old_shared = {p: p.read_bytes() for p in (store.path_for("alice@shared"), record(store, "alice@shared"))}
    store.save_parts("alice", {"personal": make_prefix(4)}, RAW, drop=("shared",))
    assert header(store, "alice").parts == ["personal"]
    for path, data in old_shared.items():  # file and record, both authentic
        path.write_bytes(data)
    with pytest.raises(PartsMismatchError, match="stored now: personal, shared"):
        store.load_parts("alice", RAW)


def test_saving_one_part_reseals_the_other_in_the_same_write(store):
    store.save("alice", make_prefix(1), RAW)
    assert header(store, "alice").parts == ["personal"] and header(store, "alice").counter == 1
    store.save("alice", make_prefix(2), RAW, part="shared")  # the personal part is re-sealed with it
    assert header(store, "alice").parts == ["personal", "shared"] and header(store, "alice").counter == 2
    assert header(store, "alice").write_id == header(store, "alice@shared").write_id
    before = header(store, "alice@shared")
    store.save("alice", make_prefix(5), RAW)
    after = header(store, "alice@shared")
    assert after.counter == before.counter + 1 and after.write_id == header(store, "alice").write_id
    assert after.payload_nonce == before.payload_nonce, "the other part's ciphertext is kept, not re-encrypted"
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(5)) and same(parts["shared"], make_prefix(2))
    store.path_for("alice@shared").unlink()
    with pytest.raises(PartsMismatchError):
        store.load_parts("alice", RAW)


def test_an_older_copy_of_one_part_put_back_with_its_record_is_refused(store):
    """Each part's record alone rules out an older copy of that part only without its record."""
    both(store)
    old = {p: p.read_bytes() for p in (store.path_for("alice@shared"), record(store, "alice@shared"))}
    store.save_parts("alice", {"personal": make_prefix(4), "shared": make_prefix(5)}, RAW)
    for path, data in old.items():
        path.write_bytes(data)
    for read in (lambda: store.load_parts("alice", RAW), lambda: store.load("alice", RAW)):
        with pytest.raises(PartsMismatchError, match="its shared part is from another write"):
            read()
    with pytest.raises(PartsMismatchError):  # nor does a save continue from it
        store.save("alice", make_prefix(6), RAW)


def stop_after_the_first_part(monkeypatch, journal: bool = True) -> None:
    """The store's renames stop (SystemExit, as a process killed there: what is renamed stays
    renamed) after the first part's; `journal=False`: as an earlier version, which wrote none."""
    from fedprefix.common.store import locking

    real_replace, renames = locking.os.replace, []

    def replace(src, dst):
        if renames:
            raise SystemExit("stopped")
        if str(dst).endswith(".journal"):
            if not journal:
                os.unlink(src)
                return
        else:
            renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(locking.os, "replace", replace)


def test_a_save_stopped_between_its_renames_is_completed_by_the_next_load(store, monkeypatch):
    """SIGKILL or a power loss between the renames left one part new beside the other old, which
    loads refused until reset-rollback kept that mix. The write's journal now completes it."""
    both(store)
    stop_after_the_first_part(monkeypatch)
    with pytest.raises(SystemExit):
        store.save_parts("alice", {"personal": make_prefix(4), "shared": make_prefix(5)}, RAW)
    monkeypatch.undo()
    assert (store.root / ".alice.journal").exists() and list(store.root.rglob(".*.staged.tmp"))
    parts = store.load("alice@shared", RAW), store.load("alice", RAW)  # unlocked loads, as a server's
    assert same(parts[0], make_prefix(5)) and same(parts[1], make_prefix(4))
    assert not (store.root / ".alice.journal").exists() and not list(store.root.rglob("*.tmp"))


def test_an_exception_after_the_first_rename_finishes_the_write_before_it_goes_on(store, monkeypatch):
    """A signal handler that raises (a SIGALRM time limit, say) lands between two renames: the
    exception still reaches the caller, but the parts stay one write that loads."""
    from fedprefix.common.store import locking

    both(store)
    real_replace, raised = locking.os.replace, []

    def interrupted_after_the_first(src, dst):
        real_replace(src, dst)
        if not raised and not str(dst).endswith(".journal"):
            raised.append(dst)
            raise TimeoutError("the handler of a time limit")

    monkeypatch.setattr(locking.os, "replace", interrupted_after_the_first)
    with pytest.raises(TimeoutError):
        store.save_parts("alice", {"personal": make_prefix(4), "shared": make_prefix(5)}, RAW)
    monkeypatch.setattr(locking.os, "replace", real_replace)
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(4)) and same(parts["shared"], make_prefix(5))
    assert not list(store.root.rglob("*.tmp"))


def test_every_part_of_a_user_is_under_one_key(store):
    store.save("alice", make_prefix(1), RAW)
    before = files(store.root)
    with pytest.raises(WrongKeyError):  # load_parts takes one key for all of a user's parts
        store.save("alice", make_prefix(2), RAW2, part="shared")
    assert files(store.root) == before


def test_reset_rollback_accepts_the_parts_as_they_are(store):
    both(store)
    store.path_for("alice@shared").unlink()
    with pytest.raises(RollbackError):
        store.load_parts("alice", RAW)
    store.reset_rollback("alice", RAW)
    assert list(store.load_parts("alice", RAW)) == ["personal"]


def test_key_changes_keep_the_list(store):
    both(store)
    store.change_passphrase("alice", RAW, PASS)
    store.rotate_data_key("alice", PASS)
    assert header(store, "alice").parts == header(store, "alice@shared").parts == ["personal", "shared"]
    assert same(store.load_parts("alice", PASS)["shared"], make_prefix(2))


def test_delete_removes_every_part_of_the_user(store):
    both(store)
    store.save("bob", make_prefix(3), RAW)
    store.delete("alice")
    assert not store.exists("alice") and not store.exists("alice@shared") and store.exists("bob")
    with pytest.raises(UnknownUserError):
        store.load_parts("alice", RAW)
    with pytest.raises(UnknownUserError):
        store.delete("alice")


def test_a_store_from_before_parts_lists_still_loads_and_upgrades_on_its_next_write(tmp_path):
    store = format1_store(tmp_path / "store")
    assert header(store, "alice").format_version == 1 and header(store, "alice").parts is None
    assert [info.parts for info in store.list()] == [None, None]
    parts = store.load_parts("alice", RAW)
    assert same(parts["personal"], make_prefix(1)) and same(parts["shared"], make_prefix(2))
    store.change_passphrase("alice", RAW, PASS)  # re-wraps; a format-1 payload is re-encrypted for format 2
    store.save("alice", make_prefix(6), PASS)
    for name in ("alice", "alice@shared"):
        assert header(store, name).format_version == 2 and header(store, name).parts == ["personal", "shared"]
    assert [info.parts for info in store.list()] == [["personal", "shared"]] * 2  # `fedprefix store list` shows it
    assert json.loads(record(store, "alice").read_bytes())["counter"] == header(store, "alice").counter
    parts = store.load_parts("alice", PASS)
    assert same(parts["personal"], make_prefix(6)) and same(parts["shared"], make_prefix(2))


def test_a_dropped_part_needs_the_key_and_stays_refused_when_put_back_alone(store, tmp_path):
    store.save("vera", make_prefix(5), RAW, part="shared")
    with pytest.raises(WrongKeyError, match="every part of a user is under one key"):
        store.save_parts("vera", {"personal": make_prefix(6)}, RAW2, drop=("shared",))  # not vera's key
    assert same(store.load_parts("vera", RAW)["shared"], make_prefix(5))
    # a format-1 user: its shared part dropped, then put back (its record kept) with the personal one deleted
    old = format1_store(tmp_path / "v1")
    shared_v1 = old.path_for("alice@shared").read_bytes()
    old.save_parts("alice", {"personal": make_prefix(7)}, RAW, drop=("shared",))
    old.path_for("alice@shared").write_bytes(shared_v1)
    old.path_for("alice").unlink()
    with pytest.raises(RollbackError, match="an older copy was put back"):
        old.load_parts("alice", RAW)


def test_drop_names_real_parts_and_never_the_one_saved(store):
    from fedprefix.common.store import BadUserIdError

    with pytest.raises(BadUserIdError, match="part must be one of"):
        store.save_parts("alice", {"personal": make_prefix(1)}, RAW, drop=("bogus",))
    store.save_parts("alice", {"shared": make_prefix(2)}, RAW, drop=("shared",))  # the saved part is kept
    assert list(store.load_parts("alice", RAW)) == ["shared"]


def test_a_file_that_appears_while_a_reader_opens_it_is_not_a_link_to_nothing(store, monkeypatch):
    """A lockless reader got ENOENT, a writer's rename then put the file there: 'a link to nothing'."""
    from fedprefix.common import files as common_files

    store.save("alice", make_prefix(1), RAW)

    def not_yet(path):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(common_files, "open_regular", not_yet)
    with pytest.raises(UnknownUserError):
        store.load("alice", RAW)


def test_a_key_change_stopped_between_its_renames_is_completed_by_the_next_load(store, monkeypatch):
    both(store)
    stop_after_the_first_part(monkeypatch)
    with pytest.raises(SystemExit):
        store.change_passphrase("alice", RAW, PASS)
    monkeypatch.undo()
    with pytest.raises(WrongKeyError):  # the change is made: the old key no longer opens a part
        store.load_parts("alice", RAW)
    parts = store.load_parts("alice", PASS)
    assert same(parts["personal"], make_prefix(1)) and same(parts["shared"], make_prefix(2))
    store.change_passphrase("alice", RAW, PASS)  # run again (as the README had said to): no harm
    assert same(store.load_parts("alice", PASS)["shared"], make_prefix(2))


def test_a_key_change_of_parts_under_two_keys_completes_when_run_again(store, monkeypatch):
    """Parts under two keys (a change killed under an earlier version, which wrote no journal):
    the same change run again puts them under one."""
    both(store)
    stop_after_the_first_part(monkeypatch, journal=False)
    with pytest.raises(SystemExit):
        store.change_passphrase("alice", RAW, PASS)
    monkeypatch.undo()
    for key in (RAW, PASS):  # one part under each key now, from two writes
        with pytest.raises((WrongKeyError, PartsMismatchError)):
            store.load_parts("alice", key)
    with pytest.raises(WrongKeyError):  # the way out needs both keys
        store.change_passphrase("alice", RAW2, PASS)
    store.change_passphrase("alice", RAW, PASS)  # run again: completes it
    parts = store.load_parts("alice", PASS)
    assert same(parts["personal"], make_prefix(1)) and same(parts["shared"], make_prefix(2))


def test_a_key_change_does_not_bless_parts_of_two_writes(store):
    """Only a part under the new key (its owner's doing) excuses a second write; an older copy
    of one part put back with its record stays refused by a key change as by a load."""
    both(store)
    old = {p: p.read_bytes() for p in (store.path_for("alice@shared"), record(store, "alice@shared"))}
    both(store)
    for path, data in old.items():
        path.write_bytes(data)
    with pytest.raises(PartsMismatchError, match="from another write"):
        store.change_passphrase("alice", RAW, PASS)
