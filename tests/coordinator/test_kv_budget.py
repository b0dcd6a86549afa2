"""The running batch's KV budget: requests that cannot fit are refused by name, the others wait
for room, the cache's buffers never pass the budget, and every row still equals its user alone."""

from __future__ import annotations

import time

import pytest
import torch
from fedprefix.common.attention import batch_cache
from fedprefix.common.generation import SamplingParams
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving import kv_budget as kv
from fedprefix.coordinator.serving.engine import InvalidRequest
from fedprefix.coordinator.serving.scheduler import FairQueue

from tests.coordinator.test_engine import reference, request, served  # noqa: F401  (fixture)


def budget_for(engine_or_base, rows: int, widest: int) -> int:
    """Bytes that hold `rows` rows whose widest reaches `widest` slots, and not one row more."""
    base = getattr(engine_or_base, "base", engine_or_base)
    return rows * kv.KvBudget.row_slots(widest) * kv.slot_bytes(base.model.config, base.dtype)


def test_a_request_that_cannot_fit_alone_is_refused_naming_the_budget(served):  # noqa: F811
    base, store = served
    with Engine(base, store=store, kv_cache_bytes=budget_for(base, 1, 40)) as engine:
        assert engine.kv_budget.longest_alone() == 40
        with pytest.raises(InvalidRequest, match=r"exceed the 40 tokens one request may hold.*--kv-cache-mib"):
            engine.submit(request("bob", "word " * 30, max_new_tokens=20))  # bob's prefix: 5 tokens
        # a max_tokens the caller did not choose is lowered to fit, as it is for the base's context
        fitted = GenerationRequest("hello there", params=SamplingParams(max_new_tokens=500), fit_context=True)
        result = engine.submit(fitted).result(timeout=60)
    prompt_tokens = result.prompt_tokens
    assert fitted.params.max_new_tokens == 40 - prompt_tokens
    assert len(result.tokens) <= 40 - prompt_tokens


def test_the_batch_stays_within_its_budget_and_every_row_equals_its_user_alone(served):  # noqa: F811
    """One long request among short ones: no more rows run than the budget holds at the long
    one's width, the buffers (spare room included) never pass it, and nothing else changes."""
    base, store = served
    users = ["alice", "bob", None, "carol"]
    long_case = ("bob", "a long prompt " + "word " * 60, 40)
    cases = [long_case] + [(users[i % 4], f"short {i}", 6 + i % 5) for i in range(9)]
    budget = budget_for(base, 3, 130)  # three rows as wide as the long one (~105 slots)
    seen: list[tuple[int, int]] = []
    with Engine(base, store=store, max_batch_size=8, kv_cache_bytes=budget) as engine:
        batch, step = engine._batch, engine._batch.step

        def watched_step(joiners):
            step(joiners)
            seen.append((batch.kv_bytes, batch.slots))

        batch.step = watched_step
        results = engine.generate([request(u, p, max_new_tokens=n) for u, p, n in cases])
    assert max(b for b, _ in seen) <= budget
    assert 1 < max(s for _, s in seen) < len(cases)  # bounded by the budget, not serialized
    for (user, prompt, n), result in zip(cases, results, strict=True):
        assert result.tokens == reference(base, store, prompt, user, SamplingParams(max_new_tokens=n))


def test_a_request_that_does_not_fit_yet_is_not_passed_by_smaller_ones():
    """Admission stops at the first request in turn that does not fit: it keeps its place, so a
    stream of short requests cannot starve a long one."""

    class Handle:
        def __init__(self, user: str, size: int) -> None:
            self.request = type("R", (), {"user": user})()
            self.size, self.cancelled, self.done = size, False, False

    queue = FairQueue(max_total=10, max_per_user=10, max_wait_s=60)
    long, short_a, short_b = Handle("a", 9), Handle("b", 1), Handle("c", 1)
    queue.add([long, short_a, short_b])
    assert queue.take(3, lambda h: h.size < 5) == []  # the long one first in turn: nobody passes it
    assert len(queue) == 3
    assert queue.take(3, lambda h: True) == [long, short_a, short_b]


def test_an_offline_batch_never_expires_and_does_not_keep_later_requests_from_expiring():
    class Handle:
        def __init__(self, user: str | None) -> None:
            self.request = type("R", (), {"user": user})()
            self.cancelled, self.done, self.error = False, False, None

        def _fail(self, error) -> None:
            self.done, self.error = True, error

    queue = FairQueue(max_total=10, max_per_user=10, max_wait_s=0.01)
    offline, online = [Handle(None) for _ in range(3)], Handle("u")
    queue.add(offline, bounded=False)
    queue.add([online])
    time.sleep(0.05)
    assert queue.take(5, lambda h: False) == []  # nothing fits: every one still waits, or expires
    assert "waited more than" in str(online.error) and not any(h.done for h in offline)
    assert len(queue) == 3


def test_growing_buffers_shed_spare_rows_and_grow_less_within_a_budget():
    layers = [(torch.randn(2, 1, 10, 4), torch.randn(2, 1, 10, 4))]
    cache, _ = batch_cache([(layers, None, None)], headroom=6, row_capacity=8, budget=64)
    layer = cache.layers[0]
    assert (layer.row_capacity, layer.slot_capacity) == (4, 16)  # 8 spare rows would pass 64 row-slots
    layer.reserve(20)  # doubling to 32 slots would hold 4 x 32: it grows to what 2 rows allow
    assert layer.slot_capacity == 32 and layer.row_capacity == 2
    assert torch.equal(layer.keys, layers[0][0])  # the rows' KV is kept
    layer.reserve(40)  # past the budget for the rows it holds: still grown, as correctness needs
    assert layer.slot_capacity == 40 and layer.row_capacity == 2
    unbounded, _ = batch_cache([(layers, None, None)], headroom=6, row_capacity=8)
    unbounded.layers[0].reserve(20)
    assert (unbounded.layers[0].row_capacity, unbounded.layers[0].slot_capacity) == (8, 32)


def test_the_default_budget_is_a_share_of_free_memory_and_holds_one_full_context_row(served, monkeypatch):  # noqa: F811
    base, store = served
    slot = kv.slot_bytes(base.model.config, base.dtype)
    caches = (1 << 20) + (2 << 20)
    monkeypatch.setattr(kv, "available_memory", lambda: 400 << 20)
    engine = Engine(base, store=store, prefix_cache_bytes=1 << 20, prompt_cache_bytes=2 << 20)
    assert engine.kv_budget.slots == int(((400 << 20) - caches) * kv.AUTO_SHARE) // slot
    monkeypatch.setattr(kv, "available_memory", lambda: None)  # unreadable (no /proc): a fixed share
    assert Engine(base, store=store).kv_budget.bytes == kv.FALLBACK_BYTES // slot * slot
    monkeypatch.setattr(kv, "available_memory", lambda: 0)  # nothing free: still one row of the whole context
    assert Engine(base, store=store).kv_budget.longest_alone() >= engine.context_length
    for hopeless in (-1, 0, slot * kv.HEADROOM):  # a budget that holds no request is refused at once
        with pytest.raises(ValueError, match="holds no request: one takes at least"):
            Engine(base, store=store, kv_cache_bytes=hopeless)


def test_replicas_on_one_machine_split_the_budget_one_server_would_get_down_to_one_full_row(served, monkeypatch):  # noqa: F811
    """Replicas start at once and each sees the same free memory: each takes its share of what
    one server would get (every replica's caches counted), but never less than one row of the
    base's whole context (a share of a few MiB refused every long prompt)."""
    base, store = served
    slot = kv.slot_bytes(base.model.config, base.dtype)
    caches = (1 << 20) + (2 << 20)
    monkeypatch.setattr(kv, "available_memory", lambda: 400 << 20)
    engine = Engine(base, store=store, prefix_cache_bytes=1 << 20, prompt_cache_bytes=2 << 20, kv_cache_sharers=4)
    assert engine.kv_budget.slots == int(((400 << 20) - 4 * caches) * kv.AUTO_SHARE) // 4 // slot
    monkeypatch.setattr(kv, "available_memory", lambda: 1 << 20)
    assert Engine(base, store=store, kv_cache_sharers=4).kv_budget.longest_alone() >= engine.context_length
    monkeypatch.setattr(kv, "available_memory", lambda: None)  # unreadable: the fixed share, split
    assert Engine(base, store=store, kv_cache_sharers=2).kv_budget.slots == kv.FALLBACK_BYTES // 2 // slot
    with pytest.raises(ValueError, match="kv_cache_sharers must be at least 1"):
        Engine(base, store=store, kv_cache_sharers=0)


def test_rows_whose_context_and_last_piece_were_padded_apart_in_a_chunk_stay_within_the_budget(served):  # noqa: F811
    """A joiner with a long context (an earlier chunk) and a short last piece, in the chunk of
    one with a long piece: padded in the chunk to (longest context + longest piece), its row
    was nearly twice as wide as its tokens, and the cache went 1.3x past the budget."""
    base, _ = served
    first, second = [5 + i % 50 for i in range(205)], [7 + i % 50 for i in range(195)]  # read 200, then 5 + 195
    params = SamplingParams(max_new_tokens=5)
    budget = budget_for(base, 2, len(first) + 5)  # exactly the two rows at the widest reach
    seen = []
    engine = Engine(base, max_batch_size=4, kv_cache_bytes=budget, max_prefill_tokens=200)
    batch, step = engine._batch, engine._batch.step

    def watched_step(joiners):
        step(joiners)
        seen.append((batch.kv_bytes, batch.slots))

    batch.step = watched_step
    results = engine.generate([GenerationRequest(p, params=params) for p in (first, second)])
    assert max(b for b, _ in seen) <= budget and max(s for _, s in seen) == 2
    for prompt, result in zip((first, second), results, strict=True):
        assert result.tokens == Engine(base).generate([GenerationRequest(prompt, params=params)])[0].tokens
