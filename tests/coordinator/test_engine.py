"""The batching engine: every row equals the user alone, joins mid-generation, keys, streaming."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams, generate_tokens
from fedprefix.common.store import PrefixStore, WrongKeyError
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.engine import EngineOverloaded, EngineStopped
from fedprefix.coordinator.serving.rows import text_decoder

from tests.conftest import random_prefix

USERS = {"alice": 2, "bob": 5, "carol": 9}  # prefix lengths differ on purpose


def key_of(user: str) -> bytes:
    return user.encode().ljust(32, b"k")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tiny-llama and a store with three users' prefixes."""
    base = load_base("tiny-llama")
    store = PrefixStore(tmp_path_factory.mktemp("store"), scrypt_n=2**12)
    for seed, (user, tokens) in enumerate(USERS.items()):
        store.save(user, random_prefix(base, tokens, seed=seed, scale=3.0), key_of(user))
    return base, store


def reference(base, store, prompt: str, user: str | None, params: SamplingParams) -> list[int]:
    """What the user gets alone, from the plain generation loop."""
    kv = None if user is None else store.load(user, key_of(user)).key_values().detach()
    ids = base.tokenizer(prompt, add_special_tokens=False).input_ids
    return generate_tokens(base.model, base.tokenizer, [ids], [kv], params)[0]


def request(user, prompt, **params):
    return GenerationRequest(
        prompt, user=user, key=None if user is None else key_of(user), params=SamplingParams(**params)
    )


def test_mixed_batch_equals_each_user_alone(served):
    base, store = served
    cases = [("alice", "hi"), ("bob", "a much longer prompt here"), (None, "base"), ("carol", "x"), ("alice", "yo")]
    with Engine(base, store=store) as engine:
        results = engine.generate([request(u, p, max_new_tokens=12) for u, p in cases])
    for (user, prompt), result in zip(cases, results, strict=True):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=12))
    assert results[0].tokens != results[4].tokens or results[0].text != results[1].text


def test_penalized_rows_equal_the_plain_loop_beside_unpenalized_ones(served):
    base, store = served
    penalty = dict(max_new_tokens=16, presence_penalty=1.5, frequency_penalty=0.5)
    cases = [("alice", "hi", penalty), ("bob", "hi", {"max_new_tokens": 16}), ("carol", "x y", penalty)]
    with Engine(base, store=store) as engine:
        results = engine.generate([request(u, p, **params) for u, p, params in cases])
    for (user, prompt, params), result in zip(cases, results, strict=True):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(**params))
    alone = reference(base, store, "hi", "alice", SamplingParams(max_new_tokens=16))
    assert results[0].tokens != alone, "the penalty changed alice's tokens"


def test_joining_mid_generation_changes_no_row(served):
    base, store = served
    with Engine(base, store=store) as engine:
        first = [engine.submit(request(u, f"long run for {u}", max_new_tokens=40)) for u in ("alice", "bob")]
        while engine.stats.steps < 5:
            time.sleep(0.001)
        late = engine.submit(request("carol", "late joiner", max_new_tokens=10))
        results = [h.result(timeout=60) for h in (*first, late)]
    assert engine.stats.batch_sizes and max(engine.stats.batch_sizes) == 3
    for (user, prompt, n), result in zip(
        [("alice", "long run for alice", 40), ("bob", "long run for bob", 40), ("carol", "late joiner", 10)],
        results,
        strict=True,
    ):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=n))


def test_rows_leaving_and_joining_in_any_order_change_no_row(served):
    """Rows of different lengths leave from the middle of the batch (the last rows move into
    their places) while others join into its spare rows, and more than fit wait: every row
    still gets exactly what its user gets alone."""
    base, store = served
    users = ["alice", "bob", None, "carol"]
    cases = [(users[i % 4], f"prompt {i} " + "word " * (i % 5), 2 + (7 * i) % 15) for i in range(12)]
    with Engine(base, store=store, max_batch_size=5) as engine:
        handles = []
        for wave in (cases[:5], cases[5:9], cases[9:]):
            handles += [engine.submit(request(u, p, max_new_tokens=n)) for u, p, n in wave]
            steps = engine.stats.steps
            while engine.stats.steps < steps + 3 and not all(h.done for h in handles):
                time.sleep(0.001)
        results = [h.result(timeout=60) for h in handles]
    assert max(engine.stats.batch_sizes) == 5
    for (user, prompt, n), result in zip(cases, results, strict=True):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=n))


def test_one_users_key_never_opens_another_users_prefix(served):
    base, store = served
    with Engine(base, store=store) as engine:
        bob = engine.generate([request("bob", "secret", max_new_tokens=6)])[0]  # bob's prefix now cached
        stolen = GenerationRequest("secret", user="bob", key=key_of("alice"), params=SamplingParams(max_new_tokens=6))
        with pytest.raises(WrongKeyError):
            engine.submit(stolen)
        with pytest.raises(WrongKeyError):  # also straight after, through the cache
            engine.submit(stolen)
        alice = engine.generate([request("alice", "secret", max_new_tokens=6)])[0]
    assert alice.tokens != bob.tokens
    assert engine.prefixes.stats.hits == 0 and engine.prefixes.stats.misses >= 3


def test_stream_equals_result_with_stops_and_seeds(served):
    base, store = served
    with Engine(base, store=store) as engine:
        params = dict(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7)
        plain = engine.generate([request("bob", "stream me", **params)])[0]
        stop = plain.text[5:7]
        handle = engine.submit(request("bob", "stream me", **params, stop=[stop]))
        streamed = "".join(handle.deltas())
        result = handle.result()
        again = engine.generate([request("bob", "stream me", **params), request("alice", "mate", **params)])[0]
    assert again.tokens == plain.tokens, "a seed fixes a row's sampling whatever its batch mates"
    assert streamed == result.text == plain.text[: plain.text.find(stop)]
    assert result.finish_reason == "stop"


def test_overload_and_errors(served):
    base, store = served
    with Engine(base, store=store, max_queue=0) as engine:
        with pytest.raises(EngineOverloaded, match="queue is full"):
            engine.submit(request(None, "hi"))
    engine = Engine(base, store=store)
    with pytest.raises(Exception, match="not running"):
        engine.submit(request(None, "hi"))


def test_prefix_cache_is_bounded_and_follows_the_store(tmp_path):
    base = load_base("tiny-llama")
    store = PrefixStore(tmp_path / "store", scrypt_n=2**12)
    for seed, (user, tokens) in enumerate(USERS.items()):
        store.save(user, random_prefix(base, tokens, seed=seed), key_of(user))
    size = {u: store.load(u, key_of(u)).key_values().numel() * 4 for u in USERS}
    budget = size["alice"] + size["bob"]  # carol alone is larger than that
    with Engine(base, store=store, prefix_cache_bytes=budget) as engine:
        cache = engine.prefixes
        for user in ("alice", "bob", "alice", "carol", "bob"):
            engine.resolve_prefix(user, key_of(user))
        assert (cache.stats.hits, cache.stats.misses, cache.stats.entries) == (2, 3, 2)
        assert cache.stats.bytes == budget
        engine.resolve_prefix("carol", key_of("carol"))
        engine.resolve_prefix("alice", key_of("alice"))  # still cached: carol never displaced it
        assert cache.stats.hits == 3 and cache.stats.bytes <= budget
        old = engine.resolve_prefix("alice", key_of("alice"))
        store.save("alice", random_prefix(base, 2, seed=42), key_of("alice"))  # alice trained again
        fresh = engine.resolve_prefix("alice", key_of("alice"))
        assert not torch.equal(fresh, old) and cache.stats.misses == 5


def test_bfloat16_engine_keeps_prefixes_in_bfloat16_and_rows_equal_alone(served):
    base, store = served
    half = base.with_dtype(torch.bfloat16)
    cases = [("alice", "hi"), ("bob", "a much longer prompt here"), (None, "base")]
    params = SamplingParams(max_new_tokens=10)
    with Engine(half, store=store) as engine:
        results = engine.generate([request(u, p, max_new_tokens=10) for u, p in cases])
        cached = engine.resolve_prefix("bob", key_of("bob"))
        assert cached.dtype == torch.bfloat16
        assert engine.prefixes.stats.bytes == sum(
            store.load(u, key_of(u)).key_values().numel() * 2 for u in ("alice", "bob")
        )
    for (user, prompt), result in zip(cases, results, strict=True):
        assert result.tokens == reference(half, store, prompt, user, params)


def test_requests_submitted_together_share_the_first_step_or_none_is_queued(served):
    base, store = served
    batch = [request(u, "hi", max_new_tokens=3) for u in ("alice", "bob", "carol", None)]
    with Engine(base, store=store) as engine:
        engine.generate(batch)
        assert engine.stats.batch_sizes[0] == len(batch)
    with Engine(base, store=store, max_queue=3) as engine:
        with pytest.raises(EngineOverloaded, match=r"queue is full \(0 of 3"):
            engine.submit_many(batch)
        assert engine.queue_depth == 0
        wrong = GenerationRequest("hi", user="bob", key=key_of("alice"))
        with pytest.raises(WrongKeyError):
            engine.submit_many([batch[0], wrong])
        assert engine.queue_depth == 0


def test_generate_on_an_engine_not_running_computes_on_the_calling_thread(served):
    base, store = served
    cases = [("alice", "hi"), (None, "base"), ("carol", "x")]
    engine = Engine(base, store=store)
    results = engine.generate([request(u, p, max_new_tokens=6) for u, p in cases])
    assert engine._thread is None and not engine.running  # no thread was started, nothing left running
    for (user, prompt), result in zip(cases, results, strict=True):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=6))
    with pytest.raises(EngineStopped, match="not running"):
        engine.submit(request(None, "hi"))
    with pytest.raises(WrongKeyError):  # a refused request leaves the engine as it was: idle and usable
        engine.generate([GenerationRequest("hi", user="bob", key=key_of("alice"))])
    assert not engine.running and engine.generate([request(None, "again", max_new_tokens=2)])[0].tokens


def test_offline_generate_takes_any_number_of_requests_and_none_expires(served):
    """The queue's caps and wait limit protect a server from its clients; an offline caller's
    own batch failed with 'the queue is full' past max_queue, or 'waited more than' once the
    rows ahead of it took longer than max_wait_s."""
    base, store = served
    cases = [(("alice", "bob", None)[i % 3], f"offline {i}", 8 + i % 4) for i in range(10)]
    engine = Engine(base, store=store, max_batch_size=2, max_queue=3, max_queue_per_user=2, max_wait_s=0.01)
    results = engine.generate([request(u, p, max_new_tokens=n) for u, p, n in cases])
    for (user, prompt, n), result in zip(cases, results, strict=True):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=n))
    with engine, pytest.raises(EngineOverloaded, match="the queue is full"):  # a server still has its caps
        engine.submit_many([request(None, f"online {i}", max_new_tokens=4) for i in range(4)])


def test_run_serves_on_the_calling_thread_until_stopped_elsewhere(served):
    """What `fedprefix serve` does: the scheduler on the main thread, requests from others."""
    base, store = served
    engine = Engine(base, store=store)
    outcome = {}

    def client():
        try:
            while not engine.running:
                time.sleep(0.001)
            done = engine.submit(request("bob", "from another thread", max_new_tokens=5))
            outcome["done"] = done.result(timeout=60)
            outcome["unfinished"] = engine.submit(request("bob", "never finished", max_new_tokens=400, ignore_eos=True))
            while engine.stats.steps < 10:
                time.sleep(0.001)
        finally:
            engine.stop()  # also when the client failed, so that run() returns

    thread = threading.Thread(target=client)
    thread.start()
    engine.run()  # returns once the client thread calls stop()
    thread.join()
    assert engine._thread is None and not engine.running
    assert outcome["done"].tokens == reference(
        base, store, "from another thread", "bob", SamplingParams(max_new_tokens=5)
    )
    with pytest.raises(EngineStopped):
        outcome["unfinished"].result(timeout=1)


def test_the_engines_decoder_gives_the_tokenizers_text():
    """The row text the engine streams is `tokenizer.decode(ids, skip_special_tokens=True)`,
    also where it calls the Rust tokenizer directly, and where it must not (space clean-up)."""
    tokenizer = load_base("tiny-llama").tokenizer
    decode = text_decoder(tokenizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        length = int(torch.randint(1, 40, (1,), generator=generator))
        ids = torch.randint(len(tokenizer), (length,), generator=generator).tolist()
        ids += tokenizer.all_special_ids[: length % 3]  # invalid UTF-8 pieces and special tokens too
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "hello", ",", "world", "!", "it", "'", "s", "me", "."]
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer, wordpiece.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    cleaned = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    ids = cleaned("hello, world! it's me.", add_special_tokens=False).input_ids
    assert text_decoder(cleaned)(ids) == cleaned.decode(ids, skip_special_tokens=True) == "hello, world! it's me."
    assert cleaned.backend_tokenizer.decode(ids) != "hello, world! it's me."  # the clean-up is what differs


def test_a_store_given_as_a_folder_name_is_refused_by_name(served, tmp_path, monkeypatch):
    base, _ = served
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"store must be a PrefixStore .*PrefixStore\('st'\)"):
        Engine(base, "st")
    assert not (tmp_path / "st").exists()
