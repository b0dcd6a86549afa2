"""The engine's waiting room: round-robin admission, and the dead (cancelled, expired) failed
at the next admission without a scan of the whole queue at every step."""

import pytest
from fedprefix.coordinator.serving.requests import (
    EngineOverloaded,
    GenerationRequest,
    RequestCancelled,
    RequestHandle,
)
from fedprefix.coordinator.serving.scheduler import FairQueue


def handle(user: str | None) -> RequestHandle:
    return RequestHandle(GenerationRequest("hi", user=user), [1], None)


def age(handles: list[RequestHandle], seconds: float) -> None:
    for waiting in handles:
        waiting.queued_at -= seconds


def counting_sweeps(queue: FairQueue) -> list[int]:
    sweeps = [0]
    sweep = queue._drop_dead

    def counted(now):
        sweeps[0] += 1
        sweep(now)

    queue._drop_dead = counted
    return sweeps


def test_admission_is_round_robin_across_users():
    queue = FairQueue(max_total=10, max_per_user=10, max_wait_s=30)
    a1, a2, a3, b1, c1 = handle("a"), handle("a"), handle("a"), handle("b"), handle(None)
    queue.add([a1, a2, a3])
    queue.add([b1, c1])
    assert queue.take(4) == [a1, b1, c1, a2]
    assert queue.take(4) == [a3] and len(queue) == 0


def test_a_request_cancelled_deep_in_the_queue_fails_at_the_next_admission_alone():
    queue = FairQueue(max_total=100, max_per_user=100, max_wait_s=30)
    handles = [handle(f"u{i % 7}") for i in range(50)]
    queue.add(handles)
    sweeps = counting_sweeps(queue)
    for _ in range(5):  # nothing cancelled or expired: no sweep, however long the queue
        assert queue.take(0) == []
    assert sweeps == [0]
    handles[37].cancel()
    assert queue.take(0) == [] and sweeps == [1]
    with pytest.raises(RequestCancelled):
        handles[37].result(timeout=0)
    assert len(queue) == 49 and not handles[37].waiting
    taken = queue.take(100)
    assert handles[37] not in taken and len(taken) == 49 and not any(h.done for h in taken)
    taken[0].cancel()  # admitted: its cancel is the batch's business, not the queue's
    assert queue.take(0) == [] and sweeps == [1]


def test_requests_that_waited_too_long_fail_even_while_no_slot_is_free():
    queue = FairQueue(max_total=100, max_per_user=100, max_wait_s=5)
    old, fresh = [handle("a"), handle("b")], [handle("a"), handle("c")]
    queue.add(old)
    age(old, 5.5)
    queue.add(fresh)
    sweeps = counting_sweeps(queue)
    assert queue.take(0) == [] and sweeps == [1]  # room for none: the expired fail all the same
    for late in old:
        with pytest.raises(EngineOverloaded, match="waited more than 5 s"):
            late.result(timeout=0)
    assert len(queue) == 2 and queue.take(0) == [] and sweeps == [1]
    age(fresh, 4.0)  # a second of real time to spare: a stall must not expire them early
    assert queue.take(0) == [] and sweeps == [1]
    age(fresh, 1.1)
    assert queue.take(10) == [] and sweeps == [2] and all(h.done for h in fresh) and len(queue) == 0


def test_draining_and_admitting_leave_no_handle_marked_waiting():
    queue = FairQueue(max_total=10, max_per_user=10, max_wait_s=30)
    handles = [handle("a"), handle("b"), handle("c")]
    queue.add(handles)
    taken = queue.take(1)
    rest = queue.drain()
    assert taken + rest == handles and len(queue) == 0
    assert not any(h.waiting or h.on_cancel for h in handles)
    assert queue.take(5) == []
