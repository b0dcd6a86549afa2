"""Per-user prompt caching and chunked prefill: reuse never changes a token, never crosses users."""

from __future__ import annotations

import time

import pytest
import torch
from fedprefix.common.generation import SamplingParams, generate_tokens
from fedprefix.common.store import WrongKeyError
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.prefix_cache import Owner
from fedprefix.coordinator.serving.prompt_cache import PromptCache

from tests.conftest import random_prefix
from tests.coordinator.test_engine import key_of, reference, request, served  # noqa: F401  (fixture)


def kv(n: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((2, 2, 1, n, 4), fill)  # (L, 2, H, n, D)


ALICE, BOB = Owner("alice", b"a", (1,)), Owner("bob", b"b", (1,))


def test_longest_common_prefix_is_reused_and_the_last_token_always_computed():
    cache = PromptCache(max_bytes=1 << 20)
    cache.store(ALICE, [1, 2, 3, 4], torch.arange(4.0).view(1, 1, 1, 4, 1).expand(2, 2, 1, 4, 4).contiguous())
    n, found = cache.match(ALICE, [1, 2, 3, 9, 9])
    assert n == 3 and found.shape == (2, 2, 1, 3, 4) and found[0, 0, 0, :, 0].tolist() == [0.0, 1.0, 2.0]
    assert cache.match(ALICE, [1, 2, 3, 4])[0] == 3  # never the whole prompt: its last logits are needed
    assert cache.match(ALICE, [7, 1, 2])[0] == 0
    assert cache.stats.hits == 2 and cache.stats.misses == 1 and cache.stats.tokens_saved == 6


def test_entries_never_cross_users_keys_or_prefix_versions():
    cache = PromptCache(max_bytes=1 << 20)
    cache.store(ALICE, [1, 2, 3], kv(3))
    assert cache.match(BOB, [1, 2, 3, 4])[0] == 0
    assert cache.match(Owner("alice", b"other key", (1,)), [1, 2, 3, 4])[0] == 0
    retrained = Owner("alice", b"a", (2,))
    assert cache.match(retrained, [1, 2, 3, 4])[0] == 0
    cache.store(retrained, [5, 6], kv(2))  # the old version's entries are freed at once
    assert cache.match(ALICE, [1, 2, 3, 4])[0] == 0 and cache.stats.entries == 1
    assert cache.stats.bytes == kv(2).numel() * 4
    other_key = Owner("alice", b"second key", (2,))  # the same version under another key: not stale
    cache.store(other_key, [5, 7], kv(2))
    cache.store(BOB, [5, 6], kv(2))
    assert cache.match(retrained, [5, 6, 0])[0] == 2 and cache.match(other_key, [5, 7, 0])[0] == 2
    cache.store(Owner("alice", b"a", (3,)), [9], kv(1))  # retrained again: both of version 2 go, bob stays
    assert cache.stats.entries == 2 and cache.match(other_key, [5, 7, 0])[0] == 0
    assert cache.match(BOB, [5, 6, 0])[0] == 2
    cache.drop_user("alice")
    assert cache.stats.entries == 1 and cache.stats.bytes == kv(2).numel() * 4


def test_a_request_of_a_replaced_prefix_that_finishes_late_keeps_nothing_and_frees_nothing_newer():
    current = {"alice": (2,)}
    cache = PromptCache(max_bytes=1 << 20, current_version=current.__getitem__)
    retrained, old = Owner("alice", b"a", (2,)), Owner("alice", b"a", (1,))
    cache.store(retrained, [5, 6], kv(2))
    cache.store(old, [1, 2, 3], kv(3))  # began before the save, finished after it
    assert cache.stats.entries == 1 and cache.match(retrained, [5, 6, 0])[0] == 2
    assert cache.match(old, [1, 2, 3, 4])[0] == 0
    current["alice"] = (3,)  # saved again: the next store frees version 2, whoever's it is
    cache.store(Owner("alice", b"other key", (3,)), [9, 9], kv(2))
    assert cache.stats.entries == 1 and cache.match(retrained, [5, 6, 0])[0] == 0

    def unreadable(user):
        raise PermissionError(f"store folder of {user}")

    cache.current_version = unreadable  # nothing is kept, and nothing raises into the engine's step
    cache.store(Owner("alice", b"a", (3,)), [4], kv(1))
    assert cache.stats.entries == 1


def test_extending_entries_replace_covered_ones_and_bytes_stay_bounded():
    one = kv(1).numel() * 4  # bytes per token slot
    cache = PromptCache(max_bytes=10 * one)
    cache.store(ALICE, [1, 2], kv(2))
    cache.store(ALICE, [1, 2, 3, 4], kv(4))  # extends [1, 2]: replaces it
    cache.store(ALICE, [1, 2, 3], kv(3))  # covered by [1, 2, 3, 4]: nothing new
    assert cache.stats.entries == 1 and cache.stats.bytes == 4 * one
    cache.store(BOB, [7, 7, 7, 7], kv(4))
    cache.match(ALICE, [1, 2, 3, 4, 5])  # alice is now the most recently used
    cache.store(BOB, [8, 8, 8, 8], kv(4))  # 12 slots > 10: the least recently used (bob's first) goes
    assert cache.stats.bytes == 8 * one and cache.stats.evictions == 1
    assert cache.match(BOB, [7, 7, 7, 7, 7])[0] == 0 and cache.match(ALICE, [1, 2, 3, 4, 5])[0] == 4
    cache.store(BOB, list(range(11)), kv(11))  # larger than the whole cache: not kept
    assert cache.stats.bytes == 8 * one
    cache.drop_user("alice")
    assert cache.stats.bytes == 4 * one and cache.match(ALICE, [1, 2, 3, 4, 5])[0] == 0
    with pytest.raises(ValueError, match="KV of 2 slots for 3 tokens"):
        cache.store(ALICE, [1, 2, 3], kv(2))


def continuation(base, store, user: str, token_ids: list[int], n: int) -> list[int]:
    """What `user` gets alone for a prompt given as token ids (plain generation loop)."""
    prefix = store.load(user, key_of(user)).key_values().detach()
    return generate_tokens(base.model, base.tokenizer, [token_ids], [prefix], SamplingParams(max_new_tokens=n))[0]


def test_a_returning_user_reuses_its_prompt_and_gets_the_same_tokens(served):  # noqa: F811
    base, store = served
    system = "You are a helpful assistant who answers briefly and well. "
    params = SamplingParams(max_new_tokens=8)
    with Engine(base, store=store) as engine:
        first = engine.submit(request("alice", system + "What is a prefix?", max_new_tokens=8)).result(timeout=60)
        computed = engine.stats.prefill_tokens
        # the same system prompt, another question: its fixed head is not computed again
        second = engine.submit(request("alice", system + "And a key?", max_new_tokens=8)).result(timeout=60)
        assert (
            engine.prompts.stats.hits == 1
            and engine.prompts.stats.tokens_saved >= len(base.tokenizer(system, add_special_tokens=False).input_ids) - 1
        )
        # the chat's next turn sends its history again: prompt, the reply, a new question
        history = base.tokenizer(system + "What is a prefix?", add_special_tokens=False).input_ids + first.tokens
        turn = history + base.tokenizer(" Thanks!", add_special_tokens=False).input_ids
        saved = engine.prompts.stats.tokens_saved
        third = engine.submit(GenerationRequest(turn, user="alice", key=key_of("alice"), params=params)).result(60)
        assert engine.prompts.stats.tokens_saved - saved >= len(history) - 1  # reply tokens cached too
        assert engine.stats.prefill_tokens - computed < len(turn) + len(second.tokens) + 40
        # another user sending the very same prompt reuses nothing of alice's
        hits = engine.prompts.stats.hits
        bob = engine.submit(request("bob", system + "What is a prefix?", max_new_tokens=8)).result(timeout=60)
        assert engine.prompts.stats.hits == hits
        # a wrong key is refused before any cache is looked at
        with pytest.raises(WrongKeyError):
            engine.submit(GenerationRequest(turn, user="alice", key=key_of("bob"), params=params))
    assert first.tokens == reference(base, store, system + "What is a prefix?", "alice", params)
    assert second.tokens == reference(base, store, system + "And a key?", "alice", params)
    assert third.tokens == continuation(base, store, "alice", turn, 8)
    assert bob.tokens == reference(base, store, system + "What is a prefix?", "bob", params)


def test_a_retrained_prefix_is_never_served_stale_prompt_kv(served, tmp_path):  # noqa: F811
    base, _ = served
    from fedprefix.common.store import PrefixStore

    store = PrefixStore(tmp_path / "store", scrypt_n=2**12)
    store.save("alice", random_prefix(base, 3, seed=1, scale=3.0), key_of("alice"))
    prompt = "the same question, asked twice over"
    with Engine(base, store=store) as engine:
        engine.submit(request("alice", prompt, max_new_tokens=6)).result(timeout=60)
        time.sleep(0.01)  # a new mtime even on coarse clocks
        store.save("alice", random_prefix(base, 3, seed=2, scale=3.0), key_of("alice"))  # trained again
        again = engine.submit(request("alice", prompt, max_new_tokens=6)).result(timeout=60)
        assert engine.prompts.stats.hits == 0 and engine.prompts.stats.entries == 1
    assert again.tokens == reference(base, store, prompt, "alice", SamplingParams(max_new_tokens=6))


def test_chunked_prefill_keeps_streams_running_and_changes_no_token(served):  # noqa: F811
    base, store = served
    long_prompt = " ".join(f"word{i}" for i in range(60))  # hundreds of tokens: many 8-token chunks
    long_ids = base.tokenizer(long_prompt, add_special_tokens=False).input_ids
    with Engine(base, store=store, max_prefill_tokens=8) as engine:
        running = engine.submit(request("bob", "a stream already running", max_new_tokens=200, ignore_eos=True))
        while engine.stats.steps < 3:
            time.sleep(0.001)
        steps_before = engine.stats.steps
        late = engine.submit(request("carol", long_prompt, max_new_tokens=5))
        first_delta = next(iter(late.deltas()), None)
        steps_to_first_token = engine.stats.steps - steps_before
        results = running.result(timeout=120), late.result(timeout=120)
    # the running stream got a token at every step while carol's prompt was read 8 tokens at a time
    assert steps_to_first_token >= len(long_ids) // 8 - 1
    assert first_delta is not None and len(engine.stats.token_gaps) >= steps_to_first_token
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    assert results[0].tokens == reference(base, store, "a stream already running", "bob", params)
    assert results[1].tokens == reference(base, store, long_prompt, "carol", SamplingParams(max_new_tokens=5))


def test_many_joiners_prefill_in_chunks_with_equal_tokens(served):  # noqa: F811
    base, store = served
    cases = [(u, f"{u} asks question number {i} of many") for i in range(4) for u in ("alice", "bob", "carol")]
    cases.append((None, "an anonymous prompt is never cached"))
    with Engine(base, store=store, max_prefill_tokens=5) as engine:
        results = engine.generate([request(u, p, max_new_tokens=6) for u, p in cases])
        assert engine.prompts.stats.hits == 0  # admitted together: nothing was cached yet
        again = engine.generate([request(u, p, max_new_tokens=6) for u, p in cases])
        assert engine.prompts.stats.hits == len(cases) - 1  # every user's request, not the anonymous one
    for (user, prompt), result, repeated in zip(cases, results, again, strict=True):
        assert (
            result.tokens == repeated.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=6))
        )
    with pytest.raises(ValueError, match="max_prefill_tokens must be at least 1"):
        Engine(base, store=store, max_prefill_tokens=0)


def test_forgetting_a_user_drops_its_prefix_and_prompt_kv(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store) as engine:
        engine.submit(request("alice", "remember me", max_new_tokens=4)).result(timeout=60)
        engine.submit(request("bob", "and me", max_new_tokens=4)).result(timeout=60)
        entries = engine.prompts.stats.entries
        engine.forget_user("alice")
        assert engine.prefixes.stats.entries == 1 and engine.prompts.stats.entries == entries - 1
        misses = engine.prefixes.stats.misses
        again = engine.submit(request("alice", "remember me", max_new_tokens=4)).result(timeout=60)
        assert engine.prefixes.stats.misses == misses + 1  # unlocked again from the store
    assert again.tokens == reference(base, store, "remember me", "alice", SamplingParams(max_new_tokens=4))
