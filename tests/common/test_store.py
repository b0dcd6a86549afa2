"""Encrypted prefix store: round trips, every kind of damage refused, crash and race safety, CLI."""

from __future__ import annotations

import base64
import json
import multiprocessing
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from fedprefix.common.errors import FedPrefixError, FingerprintMismatchError
from fedprefix.common.prefix import Prefix, PrefixConfig, PrefixSpec
from fedprefix.common.store import (
    MAGIC,
    BadKeyError,
    BadUserIdError,
    CorruptError,
    PrefixStore,
    RollbackError,
    StoreError,
    TamperedError,
    TruncatedError,
    UnknownUserError,
    UnknownVersionError,
    WrongBaseError,
    WrongKeyError,
    WrongUserError,
    parse_file,
    parse_header,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

FP = "ab" * 32
OTHER_FP = "cd" * 32
SPEC = PrefixSpec(num_layers=2, num_kv_heads=2, head_dim=4, num_virtual_tokens=3)
RAW = bytes(range(32))
RAW2 = bytes(range(1, 33))
PASS = "correct horse battery staple"
N = 2**12  # low scrypt cost: tests only


def make_prefix(seed: int = 0, projection: bool = False, spec: PrefixSpec = SPEC) -> Prefix:
    config = PrefixConfig(spec=spec, prefix_projection=projection, base_fingerprint=FP)
    return Prefix(config, init="random", generator=torch.Generator().manual_seed(seed))


def same(a: Prefix, b: Prefix) -> bool:
    ta, tb = a.state_tensors(), b.state_tensors()
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture
def store(tmp_path) -> PrefixStore:
    return PrefixStore(tmp_path / "store", scrypt_n=N)


def header_span(data: bytes) -> tuple[int, int]:
    """(start, end) of the JSON header in a file."""
    (size,) = struct.unpack(">I", data[4:8])
    return 8, 8 + size


def rewrite_header(data: bytes, edit) -> bytes:
    """Re-encode the file with `edit(header_dict)` applied, canonically, length fixed."""
    start, end = header_span(data)
    obj = json.loads(data[start:end])
    edit(obj)
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + data[end:]


def flip_b64(value: str, index: int = 0) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("key", [RAW, PASS], ids=["raw", "passphrase"])
def test_round_trip_bit_for_bit(store, projection, key):
    prefix = make_prefix(1, projection)
    info = store.save("alice", prefix, key)
    assert (info.user_id, info.counter, info.dtype, info.spec) == ("alice", 1, "float32", SPEC)
    assert info.prefix_projection is projection
    loaded = store.load("alice", key, FP)
    assert same(prefix, loaded)
    assert loaded.config == prefix.config
    # A fresh instance (no cached KEK) reads it too.
    assert same(prefix, PrefixStore(store.root, scrypt_n=N).load("alice", key))


def test_anchor_and_resave_round_trip(store):
    prefix = make_prefix(2, projection=True)
    prefix.anchor = torch.randn(SPEC.num_virtual_tokens, SPEC.flat_dim, generator=torch.Generator().manual_seed(3))
    store.save("alice", prefix, PASS)
    assert same(prefix, store.load("alice", PASS))
    second = make_prefix(4)
    assert store.save("alice", second, PASS).counter == 2
    assert same(second, store.load("alice", PASS))


def test_loaded_prefix_is_trainable_and_independent(store):
    prefix = make_prefix(projection=True)
    store.save("alice", prefix, RAW)
    loaded = store.load("alice", RAW)
    reference = Prefix.from_state(prefix.config, prefix.state_tensors())
    assert same(loaded, reference) and torch.equal(loaded.key_values(), prefix.key_values())
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded.key_values().square().sum().backward()
    optimizer.step()
    assert not same(loaded, prefix) and same(store.load("alice", RAW), prefix)


def test_non_durable_store(tmp_path):
    scratch = PrefixStore(tmp_path / "scratch", scrypt_n=N, durable=False)
    scratch.save("alice", make_prefix(), RAW)
    assert same(make_prefix(), scratch.load("alice", RAW))
    scratch.delete("alice")


def test_file_layout(store):
    store.save("alice", make_prefix(), PASS)
    data = store.path_for("alice").read_bytes()
    assert data[:4] == b"FPX1"
    header, ciphertext = parse_file(data)
    start, end = header_span(data)
    assert json.loads(data[start:end])["format_version"] == 2 and header.parts == ["personal"]
    assert header.kdf.name == "scrypt" and header.kdf.n == N and header.kdf.r == 8 and header.kdf.p == 1
    assert len(ciphertext) == header.payload_length and data.endswith(ciphertext)
    assert PASS.encode() not in data
    # Fresh nonces: saving the same prefix twice gives different ciphertexts.
    store.save("alice", make_prefix(), PASS)
    header2, ciphertext2 = parse_file(store.path_for("alice").read_bytes())
    assert header2.payload_nonce != header.payload_nonce and ciphertext2 != ciphertext
    assert header2.wrapped_dek == header.wrapped_dek  # existing wrapped DEK reused


def test_kdf_cached_per_unlock(store, monkeypatch):
    import fedprefix.common.store.keys as module

    calls = []
    real = module.Scrypt

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "Scrypt", counting)
    store.save("alice", make_prefix(), PASS)
    store.save("alice", make_prefix(1), PASS)
    store.load("alice", PASS)
    assert len(calls) == 1
    store.forget_keys()
    store.load("alice", PASS)
    assert len(calls) == 2
    cached = store._kek_cache.entries
    assert PASS not in repr(cached) and PASS.encode() not in b"".join(cached)


# ------------------------------------------------------------------ damage


def test_flip_each_region_refused(store):
    store.save("alice", make_prefix(), RAW)
    path = store.path_for("alice")
    good = path.read_bytes()
    start, end = header_span(good)
    positions = {
        "magic": range(0, 4),
        "length": range(4, 8),
        "header": range(start, end),
        "ciphertext": range(end, len(good) - 16, max(1, (len(good) - 16 - end) // 40)),
        "tag": range(len(good) - 16, len(good)),
    }
    for region, where in positions.items():
        for pos in where:
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(good)
                bad[pos] ^= mask
                path.write_bytes(bytes(bad))
                with pytest.raises(StoreError) as info:
                    store.load("alice", RAW)
                if region == "magic":
                    assert isinstance(info.value, CorruptError)
                if region in ("ciphertext", "tag"):
                    assert isinstance(info.value, TamperedError), (region, pos)
                    assert "alice" in str(info.value)
    path.write_bytes(good)
    assert same(make_prefix(), store.load("alice", RAW))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda h: h["wrapped_dek"].update(ciphertext=flip_b64(h["wrapped_dek"]["ciphertext"], 5)), WrongKeyError),
        (lambda h: h["wrapped_dek"].update(nonce=flip_b64(h["wrapped_dek"]["nonce"])), WrongKeyError),
        (lambda h: h["kdf"].update(salt=flip_b64(h["kdf"]["salt"])), WrongKeyError),
        (lambda h: h.update(key_id="0" * 16), WrongKeyError),
        (lambda h: h.update(payload_nonce=flip_b64(h["payload_nonce"])), TamperedError),
        (lambda h: h.update(counter=h["counter"] + 5), TamperedError),
        (lambda h: h.update(dtype="float16"), TamperedError),
        (lambda h: h.update(header_mac="0" * 64), TamperedError),
        (lambda h: h["prefix_config"].update(prefix_projection=True), TamperedError),
        (lambda h: h.update(format_version=3), UnknownVersionError),
        (lambda h: h.update(format_version=1), CorruptError),  # format 1 has no parts list
        (lambda h: h.update(parts=["personal", "shared"]), TamperedError),  # a part listed that was never there
        (lambda h: h.update(extra=1), CorruptError),
        (lambda h: h.update(counter=1.0), CorruptError),
        (lambda h: h.update(user_id="bob"), WrongUserError),
    ],
)
def test_semantic_header_edits_refused_with_reason(store, edit, expected):
    store.save("alice", make_prefix(), PASS)
    path = store.path_for("alice")
    path.write_bytes(rewrite_header(path.read_bytes(), edit))
    with pytest.raises(expected) as info:
        store.load("alice", PASS)
    assert info.value.reason and "alice" in str(info.value)


def test_non_canonical_header_refused(store):
    store.save("alice", make_prefix(), RAW)
    path = store.path_for("alice")
    data = path.read_bytes()
    start, end = header_span(data)
    raw = json.dumps(json.loads(data[start:end]), sort_keys=True, indent=1).encode()  # same values, other bytes
    path.write_bytes(MAGIC + struct.pack(">I", len(raw)) + raw + data[end:])
    with pytest.raises(CorruptError, match="canonical"):
        store.load("alice", RAW)


def test_truncation_refused(store):
    store.save("alice", make_prefix(), RAW)
    path = store.path_for("alice")
    good = path.read_bytes()
    start, end = header_span(good)
    for length in (0, 3, 8, (start + end) // 2, (end + len(good)) // 2, len(good) - 1):
        path.write_bytes(good[:length])
        with pytest.raises(TruncatedError, match="truncated"):
            store.load("alice", RAW)
    path.write_bytes(good + b"\0")
    with pytest.raises(CorruptError):
        store.load("alice", RAW)


def test_wrong_keys(store):
    store.save("alice", make_prefix(), RAW)
    store.save("bob", make_prefix(), PASS)
    with pytest.raises(WrongKeyError, match="'alice': wrong key"):
        store.load("alice", RAW2)
    with pytest.raises(WrongKeyError, match="'bob': wrong key"):
        store.load("bob", PASS + "!")
    with pytest.raises(WrongKeyError, match="passphrase"):
        store.load("alice", PASS)
    with pytest.raises(WrongKeyError, match="raw key"):
        store.load("bob", RAW)
    with pytest.raises(WrongKeyError):  # nobody overwrites a prefix without its key
        store.save("alice", make_prefix(9), RAW2)
    assert same(make_prefix(), store.load("alice", RAW))


@pytest.mark.parametrize("key", [b"", b"x" * 31, b"x" * 33, "", 12, None, ["k"], memoryview(RAW)])
def test_bad_key_type_or_length(store, key):
    with pytest.raises(BadKeyError):
        store.save("alice", make_prefix(), key)
    assert not store.exists("alice")
    store.save("alice", make_prefix(), RAW)
    with pytest.raises(BadKeyError):
        store.load("alice", key)


def test_file_copied_to_other_user_refused(store):
    store.save("alice", make_prefix(1), RAW)
    store.save("bob", make_prefix(2), RAW2)
    shutil.copyfile(store.path_for("alice"), store.path_for("bob"))
    for key in (RAW, RAW2):
        with pytest.raises(WrongUserError, match="'bob'.*'alice'"):
            store.load("bob", key)
    with pytest.raises(WrongUserError):
        store.save("bob", make_prefix(3), RAW)
    shutil.copyfile(store.path_for("alice"), store.root / "carol.fpx")
    with pytest.raises(WrongUserError):
        store.load("carol", RAW)


def test_wrong_base_refused(store):
    store.save("alice", make_prefix(), RAW)
    with pytest.raises(WrongBaseError) as info:
        store.load("alice", RAW, OTHER_FP)
    assert isinstance(info.value, FingerprintMismatchError)
    assert same(make_prefix(), store.load("alice", RAW, FP))


def test_rollback_refused(store):
    store.save("alice", make_prefix(1), PASS)
    old = store.path_for("alice").read_bytes()
    store.save("alice", make_prefix(2), PASS)
    store.path_for("alice").write_bytes(old)
    with pytest.raises(RollbackError, match="rollback"):
        store.load("alice", PASS)
    with pytest.raises(RollbackError):
        PrefixStore(store.root, scrypt_n=N).verify("alice", PASS)
    # Deleting the rollback record does not reset the check (tests/common/test_store_rollback.py).
    (store.root / ".rollback" / "alice.json").unlink()
    with pytest.raises(RollbackError, match="reset-rollback"):
        store.load("alice", PASS)


def test_save_over_tampered_header_refused(store):
    store.save("alice", make_prefix(), RAW)
    path = store.path_for("alice")
    path.write_bytes(rewrite_header(path.read_bytes(), lambda h: h.update(counter=2**62)))
    with pytest.raises(TamperedError):
        store.save("alice", make_prefix(1), RAW)


def test_unstorable_config_is_a_clear_error(store):
    prefix = Prefix(PrefixConfig(spec=SPEC, base_fingerprint="f" * 300), init="zero")
    with pytest.raises(FedPrefixError, match="base_fingerprint"):
        store.save("alice", prefix, RAW)


def test_stale_temp_files_cleaned_only_for_own_user(store):
    """A save removes its own user's leftover by name (a scan of the folder per save made saves
    10x slower at 10,000 users); a delete also those of earlier versions (staged under random
    names, or a part set aside to remove it)."""
    mine, other = store.root / ".a.fpx.staged.tmp", store.root / ".a.fpx.b.fpx.staged.tmp"
    aside = store.root / ".a.fpx.aside.tmp"
    older, older_other = store.root / ".a.fpx.abcd1234.tmp", store.root / ".a.fpx.b.fpx.abcd1234.tmp"
    for leftover in (mine, other, aside, older, older_other):
        leftover.write_bytes(b"x")
    store.save("a", make_prefix(), RAW)
    assert not mine.exists() and other.exists() and older.exists() and aside.exists()
    store.delete("a")
    assert not older.exists() and not aside.exists() and other.exists() and older_other.exists()


def test_state_file_damaged_is_a_store_error(store):
    store.save("alice", make_prefix(), RAW)
    (store.root / ".rollback" / "alice.json").write_text("{not json")
    with pytest.raises(RollbackError, match="rollback record is damaged"):
        store.load("alice", RAW)


# ------------------------------------------------------------------ crash and races

WRITER = textwrap.dedent(
    """
    import sys, torch
    from fedprefix.common.prefix import Prefix, PrefixConfig, PrefixSpec
    from fedprefix.common.store import PrefixStore
    spec = PrefixSpec(num_layers=4, num_kv_heads=2, head_dim=64, num_virtual_tokens=16)
    prefixes = [
        Prefix(PrefixConfig(spec=spec, base_fingerprint="ab" * 32), generator=torch.Generator().manual_seed(s))
        for s in range(4)
    ]
    store = PrefixStore(sys.argv[1], scrypt_n=2**12)
    print("ready", flush=True)
    i = 0
    while True:
        store.save("alice", prefixes[i % 4], bytes(range(32)))
        i += 1
    """
)


def test_killed_writer_leaves_old_or_new(store):
    spec = PrefixSpec(num_layers=4, num_kv_heads=2, head_dim=64, num_virtual_tokens=16)
    known = [make_prefix(s, spec=spec) for s in range(4)]
    store.save("alice", known[0], RAW)
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store.root)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.01, 0.3))
        finally:
            proc.kill()  # SIGKILL: no cleanup runs
            proc.wait()
        loaded = store.load("alice", RAW)
        assert any(same(loaded, k) for k in known)
    # The lock died with the writer; saving still works and leftover temp files are cleaned.
    store.save("alice", known[1], RAW)
    assert not list(store.root.glob(".alice.fpx.*.tmp"))
    assert same(store.load("alice", RAW), known[1])


def _concurrent_writer(root: str, seed: int, saves: int) -> None:
    s = PrefixStore(root, scrypt_n=N)
    for i in range(saves):
        s.save("alice", make_prefix(seed * 100 + i), PASS)


def test_concurrent_writers(store):
    workers, saves = 3, 4
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_concurrent_writer, args=(str(store.root), w, saves)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    loaded = store.load("alice", PASS)
    assert store.info("alice").counter == workers * saves
    candidates = [make_prefix(w * 100 + i) for w in range(workers) for i in range(saves)]
    assert any(same(loaded, c) for c in candidates)


# ------------------------------------------------------------------ fuzzing

_VALID: dict[str, bytes] = {}


def _valid_file() -> bytes:
    if "data" not in _VALID:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            s = PrefixStore(tmp, scrypt_n=N)
            s.save("alice", make_prefix(), RAW)
            _VALID["data"] = s.path_for("alice").read_bytes()
    return _VALID["data"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.binary(max_size=600).map(lambda b: MAGIC + b))
def test_fuzz_random_bytes(data):
    for fn in (parse_header, parse_file):
        try:
            fn(data)
        except StoreError:
            pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_headers(data):
    good = _valid_file()
    start, end = header_span(good)
    obj = json.loads(good[start:end])
    kind = data.draw(st.sampled_from(["bytes", "value", "drop", "nested"]))
    if kind == "bytes":
        mutated = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, end - 1))
            mutated[pos] = data.draw(st.integers(0, 255))
        blob = bytes(mutated)
    else:
        if kind == "value":
            obj[data.draw(st.sampled_from(sorted(obj)))] = data.draw(_json_values)
        elif kind == "drop":
            del obj[data.draw(st.sampled_from(sorted(obj)))]
        else:
            inner = data.draw(st.sampled_from(["kdf", "wrapped_dek", "prefix_config"]))
            obj[inner][data.draw(st.sampled_from(sorted(obj[inner])))] = data.draw(_json_values)
        raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        blob = MAGIC + struct.pack(">I", len(raw)) + raw + good[end:]
    try:
        parse_file(blob)
    except StoreError:
        pass
    # The whole load path, too: only StoreError, or (a no-op mutation) the right prefix.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        s = PrefixStore(tmp, scrypt_n=N)
        s.path_for("alice").write_bytes(blob)
        try:
            assert same(s.load("alice", RAW), make_prefix())
        except StoreError:
            pass


# ------------------------------------------------------------------ key management


def test_change_passphrase_and_rotate_key_cover_every_part_of_a_user(store):
    """A user with a shared and a personal part: both move to the new key together."""
    shared, personal = make_prefix(), make_prefix()
    with torch.no_grad():
        shared.key_values().add_(1.0)
    store.save_parts("erin", {"personal": personal, "shared": shared}, PASS)
    store.change_passphrase("erin", PASS, "new-pass")
    parts = store.load_parts("erin", "new-pass")
    assert same(parts["personal"], personal) and same(parts["shared"], shared)
    with pytest.raises(WrongKeyError):
        store.load_parts("erin", PASS)
    before = {name: parse_file(store.path_for(name).read_bytes())[0].key_id for name in ("erin", "erin@shared")}
    store.rotate_data_key("erin", "new-pass")
    after = {name: parse_file(store.path_for(name).read_bytes())[0].key_id for name in ("erin", "erin@shared")}
    assert all(after[name] != before[name] for name in after), "every part gets a new data key"
    parts = PrefixStore(store.root, scrypt_n=N).load_parts("erin", "new-pass")
    assert same(parts["personal"], personal) and same(parts["shared"], shared)
    store.save_parts("erin", {"personal": personal, "shared": shared}, "new-pass")  # and saves go on
    with pytest.raises(UnknownUserError):
        store.change_passphrase("nobody", PASS, "x" * 12)


def test_change_passphrase_keeps_payload(store):
    store.save("alice", make_prefix(), PASS)
    before = store.path_for("alice").read_bytes()
    info = store.change_passphrase("alice", PASS, "new passphrase")
    after = store.path_for("alice").read_bytes()
    assert parse_file(after)[1] == parse_file(before)[1]  # payload ciphertext identical
    assert parse_file(after)[0].key_id == parse_file(before)[0].key_id
    assert info.counter == 2
    with pytest.raises(WrongKeyError):
        store.load("alice", PASS)
    with pytest.raises(WrongKeyError):
        PrefixStore(store.root, scrypt_n=N).load("alice", PASS)
    assert same(make_prefix(), PrefixStore(store.root, scrypt_n=N).load("alice", "new passphrase"))
    # The old file (old passphrase) put back is a rollback.
    store.path_for("alice").write_bytes(before)
    with pytest.raises(RollbackError):
        store.load("alice", PASS)
    store.path_for("alice").write_bytes(after)
    store.change_passphrase("alice", "new passphrase", RAW)  # to a raw key works too
    assert same(make_prefix(), store.load("alice", RAW))
    with pytest.raises(WrongKeyError):
        store.change_passphrase("alice", RAW2, PASS)


def test_rotate_data_key(store):
    store.save("alice", make_prefix(), PASS)
    before = store.path_for("alice").read_bytes()
    info = store.rotate_data_key("alice", PASS)
    after = store.path_for("alice").read_bytes()
    assert info.key_id != parse_file(before)[0].key_id
    assert parse_file(after)[1] != parse_file(before)[1]
    assert same(make_prefix(), store.load("alice", PASS))
    with pytest.raises(WrongKeyError):
        store.rotate_data_key("alice", "nope")


def test_delete(store):
    store.save("alice", make_prefix(), RAW)
    old = store.path_for("alice").read_bytes()
    assert store.exists("alice")
    store.delete("alice")
    assert not store.exists("alice") and not store.path_for("alice").exists()
    with pytest.raises(UnknownUserError):
        store.load("alice", RAW)
    with pytest.raises(UnknownUserError):
        store.delete("alice")
    # Starting over works with any key, and the deleted file put back stays refused.
    store.save("alice", make_prefix(5), RAW2)
    store.delete("alice")
    store.path_for("alice").write_bytes(old)
    with pytest.raises(RollbackError):
        store.load("alice", RAW)


def test_list_without_keys(store):
    store.save("alice", make_prefix(), RAW)
    store.save("bob@example.com", make_prefix(projection=True), PASS, dtype=torch.float16)
    (store.root / "broken.fpx").write_bytes(b"FPX1garbage")
    infos = {i.user_id: i for i in store.list()}
    assert set(infos) == {"alice", "bob@example.com", "broken"}
    assert infos["alice"].kdf == "raw" and infos["alice"].counter == 1 and infos["alice"].problem is None
    assert infos["bob@example.com"].dtype == "float16" and infos["bob@example.com"].prefix_projection
    assert infos["bob@example.com"].spec == SPEC and infos["bob@example.com"].size_bytes > 0
    assert infos["broken"].problem and infos["broken"].spec is None


@pytest.mark.parametrize("user", ["", ".hidden", "a/b", "../x", "a" * 129, "ünï", "a b", "x\n", None, 3])
def test_bad_user_ids(store, user):
    for call in (
        lambda: store.save(user, make_prefix(), RAW),
        lambda: store.load(user, RAW),
        lambda: store.exists(user),
        lambda: store.delete(user),
    ):
        with pytest.raises(BadUserIdError, match="invalid user id"):
            call()
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("user", ["a", "alice@example.com", "A-b_c.d", "x" * 128, "0"])
def test_good_user_ids(store, user):
    store.save(user, make_prefix(), RAW)
    assert same(make_prefix(), store.load(user, RAW))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(store, dtype):
    prefix = make_prefix(projection=True)
    full = store.save("full", prefix, RAW)
    info = store.save("half", prefix, RAW, dtype=dtype)
    assert info.dtype == str(dtype).removeprefix("torch.") and info.size_bytes < full.size_bytes
    loaded = store.load("half", RAW)
    expected = {k: t.to(dtype).to(torch.float32) for k, t in prefix.state_tensors().items()}
    assert all(t.dtype == torch.float32 and torch.equal(t, expected[k]) for k, t in loaded.state_tensors().items())
    raw = store.load("half", RAW, dtype=None)
    assert all(t.dtype == dtype for t in raw.state_tensors().values())
    with pytest.raises(FedPrefixError):
        store.save("half", prefix, RAW, dtype=torch.int8)


def test_store_constructor_validates_cost(tmp_path):
    for bad in (1000, 2**9, 2**21, "x"):
        with pytest.raises(FedPrefixError):
            PrefixStore(tmp_path / "s", scrypt_n=bad)
    assert PrefixStore(tmp_path / "s").scrypt_n == 2**17


# ------------------------------------------------------------------ CLI


@pytest.fixture
def cli_store(tmp_path):
    s = PrefixStore(tmp_path / "cli", scrypt_n=N)
    s.save("alice", make_prefix(), PASS)
    s.save("bob", make_prefix(1), RAW)
    (tmp_path / "bob.key").write_text(RAW.hex() + "\n")
    return s


def test_cli_list(cli_store):
    from fedprefix.coordinator.cli.store import store_app

    runner = CliRunner()
    result = runner.invoke(store_app, ["list", "--store", str(cli_store.root)])
    assert result.exit_code == 0, result.output
    assert "alice" in result.stdout and "bob" in result.stdout
    result = runner.invoke(store_app, ["list", "--store", str(cli_store.root), "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["user_id"] for r in rows] == ["alice", "bob"] and rows[0]["kdf"] == "scrypt"
    result = runner.invoke(store_app, ["list", "--store", str(cli_store.root / "missing")])
    assert result.exit_code == 1


def test_cli_verify_rotate_and_errors(cli_store, tmp_path):
    from fedprefix.coordinator.cli.store import store_app

    runner = CliRunner()
    root = str(cli_store.root)
    result = runner.invoke(
        store_app, ["verify", "alice", "--store", root, "--passphrase-env", "FP_PASS"], env={"FP_PASS": PASS}
    )
    assert result.exit_code == 0, result.output
    assert "alice" in result.stdout
    result = runner.invoke(
        store_app, ["verify", "alice", "--store", root, "--passphrase-env", "FP_PASS"], env={"FP_PASS": "wrong"}
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "wrong key" in lines[0] and "alice" in lines[0]
    result = runner.invoke(store_app, ["verify", "alice", "--store", root], input=PASS + "\n")  # piped in
    assert result.exit_code == 0, result.output
    result = runner.invoke(store_app, ["verify", "alice", "--store", root], input="")  # nothing: one clear line
    assert result.exit_code == 1 and "give --key-file or --passphrase-env" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    key_file = str(tmp_path / "bob.key")
    result = runner.invoke(store_app, ["rotate-key", "bob", "--store", root, "--key-file", key_file])
    assert result.exit_code == 0, result.output
    assert same(make_prefix(1), cli_store.load("bob", RAW))
    result = runner.invoke(store_app, ["verify", "nobody", "--store", root, "--key-file", key_file])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1


def test_cli_export_peft(cli_store, tmp_path):
    from fedprefix.coordinator.cli.store import store_app

    out = tmp_path / "adapter"
    result = CliRunner().invoke(
        store_app,
        ["export-peft", "bob", str(out), "--store", str(cli_store.root), "--key-file", str(tmp_path / "bob.key")],
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_cli_export_peft_writes_the_shared_and_the_personal_part(cli_store, tmp_path):
    """As served and as Personalizer.export_peft writes it: [shared ; personal]."""
    import json

    from fedprefix.coordinator.cli.store import store_app

    shared, personal = make_prefix(3), make_prefix(4)
    cli_store.save_parts("jack", {"personal": personal, "shared": shared}, RAW)
    (tmp_path / "jack.key").write_bytes(RAW)
    out = tmp_path / "jack-adapter"
    result = CliRunner().invoke(
        store_app,
        ["export-peft", "jack", str(out), "--store", str(cli_store.root), "--key-file", str(tmp_path / "jack.key")],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    tokens = shared.config.spec.num_virtual_tokens + personal.config.spec.num_virtual_tokens
    assert config["num_virtual_tokens"] == tokens


def test_cli_covers_every_part_and_refuses_odd_inputs_in_one_line(cli_store, tmp_path):
    """verify checks the shared part too (a flipped byte there passed as "intact"); rotate-key
    and change-passphrase work for a user with only a shared part; a key file that is a device
    or too large, a passphrase that is not Unicode text, and an export into a folder that is
    not empty are each refused in one line."""
    from fedprefix.coordinator.cli.store import store_app

    runner, root = CliRunner(), str(cli_store.root)
    key_file = str(tmp_path / "bob.key")
    cli_store.save_parts("kim", {"personal": make_prefix(5), "shared": make_prefix(6)}, RAW)
    shared = cli_store.path_for("kim@shared")
    data = bytearray(shared.read_bytes())
    data[-3] ^= 1
    shared.write_bytes(bytes(data))
    result = runner.invoke(store_app, ["verify", "kim", "--store", root, "--key-file", key_file])
    assert result.exit_code == 1 and "kim@shared" in result.stderr, result.output

    cli_store.save("lou", make_prefix(7), PASS, part="shared")  # a shared part only
    env = {"OLD": PASS, "NEW": "another passphrase"}
    result = runner.invoke(store_app, ["rotate-key", "lou", "--store", root, "--passphrase-env", "OLD"], env=env)
    assert result.exit_code == 0 and "lou@shared" in result.stdout, result.output
    change = ["change-passphrase", "lou", "--store", root, "--passphrase-env", "OLD", "--new-passphrase-env", "NEW"]
    result = runner.invoke(store_app, change, env=env)
    assert result.exit_code == 0, result.output
    assert same(cli_store.load("lou@shared", "another passphrase"), make_prefix(7))
    with pytest.raises(WrongKeyError):
        PrefixStore(cli_store.root).load("lou@shared", PASS)

    for bad_key_file, reason in (("/dev/zero", "not a regular file"), (tmp_path / "big.key", "larger than")):
        (tmp_path / "big.key").write_bytes(b"0" * 5000)
        result = runner.invoke(store_app, ["verify", "bob", "--store", root, "--key-file", str(bad_key_file)])
        assert result.exit_code == 1 and reason in result.stderr, result.output
    bad = {"BAD": "pa\udcffss"}  # bytes that are not UTF-8, as Python reads them from the environment
    result = runner.invoke(store_app, ["verify", "alice", "--store", root, "--passphrase-env", "BAD"], env=bad)
    assert result.exit_code == 1 and "BAD is not UTF-8 text" in result.stderr and "udcff" not in result.stderr

    out = tmp_path / "taken"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # another user's adapter
    export = ["export-peft", "bob", str(out), "--store", root, "--key-file", key_file]
    result = runner.invoke(store_app, export)
    assert (
        result.exit_code == 1 and "--overwrite" in result.stderr and (out / "adapter_config.json").read_text() == "{}"
    )
    assert runner.invoke(store_app, [*export, "--overwrite"]).exit_code == 0


def test_a_processs_first_load_imports_no_compiler(tmp_path):
    """A load builds the prefix on the CPU: one built on the meta device ran its init through
    torch's reference kernels, importing torch._dynamo (1.4 s) on the first load of a process
    without transformers (`fedprefix store verify`), and readers racing saves never finished
    a load before the saves ended."""
    script = textwrap.dedent(
        f"""
        import sys
        from fedprefix.common.prefix import Prefix, PrefixConfig, PrefixSpec
        from fedprefix.common.store import PrefixStore
        spec = PrefixSpec(num_layers=30, num_kv_heads=3, head_dim=64, num_virtual_tokens=16)
        store = PrefixStore({str(tmp_path)!r}, scrypt_n=2**10)
        store.save("alice", Prefix(PrefixConfig(spec=spec, base_fingerprint="f" * 64)), b"k" * 32)
        assert "torch._dynamo" not in sys.modules
        PrefixStore({str(tmp_path)!r}).load("alice", b"k" * 32)
        print("torch._dynamo" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_a_server_cycling_through_many_passphrase_users_derives_each_key_once(store, monkeypatch):
    """With 64 passphrase keys kept, every user past the 64th paid a full scrypt again whenever
    a server's prefix cache had let them go (0.6 s median with 100 users cycling, an auditor's)."""
    from fedprefix.common.store import keys

    users = [f"u{i}" for i in range(200)]
    for user in users:
        store.save(user, make_prefix(), f"pass {user}")
    derived = []
    real = keys.Scrypt

    def counted(**settings):
        derived.append(1)
        return real(**settings)

    monkeypatch.setattr(keys, "Scrypt", counted)
    for _ in range(2):
        for user in users:
            store.load(user, f"pass {user}")
    assert derived == []  # every key was derived when it was saved, and kept
