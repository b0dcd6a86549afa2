"""Keys at the server: Unicode passphrases through an ASCII-only header, bounded and throttled unlocks."""

from __future__ import annotations

import base64
import errno
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams, generate_tokens
from fedprefix.common.store import PrefixStore, StoreBusyError, StoreIOError, WrongKeyError
from fedprefix.common.store import keys as store_keys
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.api import ApiError, parse_key, store_error
from fedprefix.coordinator.serving.prefix_cache import PrefixCache
from fedprefix.coordinator.serving.server import KEY_HEADER, create_app
from fedprefix.coordinator.serving.unlock import UnlockGuard, UnlockThrottled

from tests.conftest import random_prefix
from tests.coordinator.test_server import LoopbackServer

PASSPHRASE = "pässwörd 鍵"


def b64_header(passphrase: str) -> dict:
    return {KEY_HEADER: "b64:" + base64.b64encode(passphrase.encode()).decode()}


@pytest.fixture(scope="module")
def unicode_store(tmp_path_factory):
    base = load_base("tiny-llama")
    store = PrefixStore(tmp_path_factory.mktemp("unicode-store"), scrypt_n=2**12)
    store.save("dora", random_prefix(base, 3, seed=5, scale=3.0), PASSPHRASE)
    for name in ("dora2", "dora3"):
        store.save(name, random_prefix(base, 3, seed=6, scale=3.0), PASSPHRASE)
    return base, store


def test_header_forms():
    raw = bytes(range(32))
    assert parse_key(base64.b64encode(raw).decode()) == raw  # today's forms still work
    assert parse_key("correct horse battery staple") == "correct horse battery staple"
    assert parse_key(b64_header(PASSPHRASE)[KEY_HEADER]) == PASSPHRASE
    assert parse_key(PASSPHRASE.encode().decode("latin-1")) == PASSPHRASE  # raw UTF-8 bytes, as the server reads them
    for bad in ("b64:not base64!", "b64:" + base64.b64encode(b"\xff\xfe").decode(), "b64:"):
        with pytest.raises(ApiError) as caught:
            parse_key(bad)
        assert caught.value.status == 400 and caught.value.code == "bad_key_header"


def test_a_unicode_passphrase_works_through_the_header_and_the_openai_client(unicode_store):
    openai = pytest.importorskip("openai")
    base, store = unicode_store
    kv = store.load("dora", PASSPHRASE).key_values().detach()
    ids = base.tokenizer("hello", add_special_tokens=False).input_ids
    expected = base.tokenizer.decode(generate_tokens(base.model, base.tokenizer, [ids], [kv], SamplingParams())[0])
    body = {"prompt": "hello", "user": "dora", "max_tokens": 64, "temperature": 0}
    with Engine(base, store=store) as engine, TestClient(create_app(engine, "m")) as client:
        reply = client.post("/v1/completions", json=body, headers=b64_header(PASSPHRASE))
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected
        utf8 = client.post("/v1/completions", json=body, headers={KEY_HEADER: PASSPHRASE.encode()})
        assert utf8.status_code == 200  # curl-style raw UTF-8 header bytes also work
        assert client.post("/v1/completions", json=body, headers=b64_header("passwörd 鍵")).status_code == 403
        with LoopbackServer(create_app(engine, "m")) as url:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", default_headers=b64_header(PASSPHRASE))
            done = api.completions.create(model="m", prompt="hello", max_tokens=64, temperature=0, user="dora")
    assert done.choices[0].text == expected


def test_concurrent_wrong_passphrases_run_at_most_n_derivations(unicode_store, monkeypatch):
    base, store = unicode_store
    active, peak, lock, real = [0], [0], threading.Lock(), store_keys.Scrypt

    class SlowScrypt:  # what bounds memory: how many derivations (128 MiB each by default) run at once
        def __init__(self, **settings):
            self.inner = real(**settings)

        def derive(self, secret):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.2)
                return self.inner.derive(secret)
            finally:
                with lock:
                    active[0] -= 1

    monkeypatch.setattr(store_keys, "Scrypt", SlowScrypt)
    outcomes = []
    guard = UnlockGuard(max_concurrent=2, wait_s=0.05, max_failures=100)
    with Engine(base, store=store, unlock_guard=guard) as engine:

        def guess(i):  # a user's unlocks run one at a time: the bound shows across users
            try:
                engine.submit(GenerationRequest("x", user=("dora", "dora2", "dora3")[i % 3], key=f"guess {i}"))
            except (WrongKeyError, UnlockThrottled) as exc:
                outcomes.append(type(exc))

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert peak[0] == 2 and len(outcomes) == 12
    assert outcomes.count(UnlockThrottled) >= 1 and outcomes.count(WrongKeyError) >= 2


def test_a_burst_of_concurrent_wrong_keys_gets_no_more_guesses_than_the_backoff_allows():
    guard, tried, lock = UnlockGuard(max_concurrent=4, wait_s=10, max_failures=5, backoff_s=60), [], threading.Lock()

    def wrong_key():
        with lock:
            tried.append(1)
        time.sleep(0.02)  # a derivation
        raise WrongKeyError("wrong key")

    outcomes = []

    def guess():
        try:
            guard.unlock("dora", "guess", wrong_key)
        except (WrongKeyError, UnlockThrottled) as exc:
            outcomes.append(type(exc))

    threads = [threading.Thread(target=guess) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(tried) == 5 and outcomes.count(WrongKeyError) == 5 and outcomes.count(UnlockThrottled) == 11
    assert guard._turns == {}  # nothing kept for a user nobody is unlocking


def test_concurrent_first_requests_of_a_user_derive_the_key_once(unicode_store, monkeypatch):
    base, store = unicode_store
    loads, real = [], store.load_parts

    def counted(*args, **kwargs):
        loads.append(args[0])
        time.sleep(0.1)  # while the others wait for their turn
        return real(*args, **kwargs)

    with Engine(base, store=store) as engine:
        monkeypatch.setattr(engine.prefixes.store, "load_parts", counted)
        handles = []
        threads = [
            threading.Thread(target=lambda: handles.append(engine.submit(GenerationRequest("x", "dora3", PASSPHRASE))))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        texts = {handle.result(timeout=60).text for handle in handles}
    assert loads == ["dora3"] and len(handles) == 6 and len(texts) == 1
    assert engine.prefixes.stats.misses == 1 and engine.prefixes.stats.hits == 5


def test_a_user_the_server_lets_go_leaves_no_key_derived_from_their_passphrase(tmp_path, monkeypatch):
    """The store keeps the keys it derives from passphrases (a scrypt each), which open a user's
    files as the passphrase does: once a replica lets a user go, none of theirs stays in memory."""
    base = load_base("tiny-llama")
    store = PrefixStore(tmp_path, scrypt_n=2**10)
    for user in ("ann", "ben"):
        store.save(user, random_prefix(base, 3, seed=1), f"pass {user}")
    cache = PrefixCache(PrefixStore(tmp_path), base.fingerprint)
    for user in ("ann", "ben"):
        cache.get(user, f"pass {user}")
    derived, real = [], store_keys.Scrypt
    monkeypatch.setattr(store_keys, "Scrypt", lambda **settings: derived.append(1) or real(**settings))

    cache.forget("ann")

    assert cache.stats.entries == 1 and len(cache.store._kek_cache.entries) == 1
    cache.get("ben", "pass ben")
    assert derived == []  # the others' keys stay
    cache.get("ann", "pass ann")
    assert derived == [1]  # unlocked afresh


def test_a_requests_repr_leaves_its_key_out():
    """A request in a log line, a test failure or a debugger showed the passphrase or raw key."""
    for key in (PASSPHRASE, bytes(range(32))):
        shown = repr(GenerationRequest("hello", "dora", key))
        assert "dora" in shown and repr(key) not in shown and "key" not in shown


def test_wrong_keys_for_a_user_back_off_with_429_and_retry_after(unicode_store):
    base, store = unicode_store
    now = [0.0]
    guard = UnlockGuard(max_failures=2, backoff_s=30, clock=lambda: now[0])
    body = {"prompt": "x", "user": "dora", "max_tokens": 2}
    wrong, right = b64_header("guess"), b64_header(PASSPHRASE)
    with Engine(base, store=store, unlock_guard=guard) as engine, TestClient(create_app(engine, "m")) as client:
        assert client.post("/v1/completions", json=body, headers=right).status_code == 200  # now cached
        assert [client.post("/v1/completions", json=body, headers=wrong).status_code for _ in range(2)] == [403, 403]
        throttled = client.post("/v1/completions", json=body, headers=wrong)
        assert throttled.status_code == 429 and throttled.headers["retry-after"] == "30"
        assert throttled.json()["error"]["code"] == "unlock_throttled"
        assert client.post("/v1/completions", json=body, headers=right).status_code == 200  # cached: still served
        now[0] += 31
        assert client.post("/v1/completions", json=body, headers=wrong).status_code == 403
        again = client.post("/v1/completions", json=body, headers=wrong)  # third in a row: 60 s now
        assert again.status_code == 429 and again.headers["retry-after"] == "60"
        engine.prefixes._entries.clear()  # not cached: the owner waits out the backoff too
        assert client.post("/v1/completions", json=body, headers=right).status_code == 429
        now[0] += 61
        assert client.post("/v1/completions", json=body, headers=right).status_code == 200
        assert client.post("/v1/completions", json=body, headers=wrong).status_code == 403  # count cleared


def test_serve_has_the_settings_and_refuses_bad_ones_before_loading(tmp_path):
    from fedprefix.coordinator.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    text = runner.invoke(app, ["serve", "--help"], terminal_width=200).output
    options = ("--max-prompts", "--max-stops", "--max-messages", "--max-body-kib", "--max-queue-per-user")
    for option in (*options, "--max-unlocks"):
        assert option in text
    result = runner.invoke(app, ["serve", "--base", "nope", "--store", str(tmp_path), "--max-prompts", "0"])
    assert result.exit_code == 2 and "--max-prompts" in result.output  # a usage error, before anything loads


def test_a_passphrase_and_a_raw_key_of_the_same_bytes_are_different_keys(tmp_path):
    """A 32-character ASCII passphrase and the raw key of its bytes: the store refuses the raw
    key, and so does the cache, also once the passphrase unlocked the user (it answered 200)."""
    base = load_base("tiny-llama")
    store = PrefixStore(tmp_path / "store", scrypt_n=2**12)
    passphrase = "x" * 32
    store.save("erin", random_prefix(base, 3, seed=8), passphrase)
    cache = PrefixCache(store, base.fingerprint)
    for key in (passphrase.encode(), passphrase, passphrase.encode()):
        if isinstance(key, bytes):
            with pytest.raises(WrongKeyError):
                cache.get("erin", key)
        else:
            cache.get("erin", key)


def test_a_save_during_a_load_never_pairs_parts_of_two_saves(tmp_path, monkeypatch):
    """A user's shared and personal parts are read together: a save that lands between the two
    reads waits, so the cache holds the parts of one save (it joined one save's shared part to
    another's personal part, under load)."""
    base = load_base("tiny-llama")
    store = PrefixStore(tmp_path / "store", scrypt_n=2**12)
    pair = lambda seed: {"shared": random_prefix(base, 2, seed=seed), "personal": random_prefix(base, 3, seed=seed + 1)}  # noqa: E731
    first, second = pair(10), pair(20)
    store.save_parts("finn", first, PASSPHRASE)
    real_decrypt, saver = store._decrypt, []

    def load_then_save(name, *args, **kwargs):  # the first part read, then another save starts
        loaded = real_decrypt(name, *args, **kwargs)
        if not saver:
            saver.append(threading.Thread(target=store.save_parts, args=("finn", second, PASSPHRASE)))
            saver[0].start()
            time.sleep(0.3)  # the save would be done by now, were it not waiting for the reader
        return loaded

    monkeypatch.setattr(store, "_decrypt", load_then_save)
    kv = PrefixCache(store, base.fingerprint).get("finn", PASSPHRASE)
    saver[0].join()
    expected = {
        name: torch.cat([p["shared"].key_values(), p["personal"].key_values()], dim=3)
        for name, p in (("first", first), ("second", second))
    }
    assert any(torch.allclose(kv, want) for want in expected.values()), "parts of two saves"


def test_the_http_reply_to_a_failing_store_keeps_its_paths_in_the_log(caplog):
    error = StoreIOError.of("alice", OSError(errno.EIO, "Input/output error", "/srv/secret/alice.fpx"))
    reply = store_error(error)
    assert reply.status == 500 and reply.code == "io_error"
    assert "/srv/secret" not in str(reply.message) and "'alice'" in str(reply.message)
    assert "/srv/secret/alice.fpx" in caplog.text


def test_a_user_busy_in_the_store_is_a_503_to_try_again():
    """A writer holding the user past the lock's timeout, or a write left for a writer to complete
    (a read-only store): the request may succeed later, so 503 with Retry-After, not a 500."""
    reply = store_error(StoreBusyError("prefix of user 'alice': alice.lock stayed locked for 60 s", "alice"))
    assert (reply.status, reply.code, reply.headers) == (503, "busy", {"Retry-After": "1"})
