"""The waiting room of the engine: one queue per user, admission round-robin across users.

A plain FIFO let one request with many prompts (or one busy user) hold every batch slot
while others waited behind it. Here each user (all anonymous requests counting as one
user) has its own FIFO, and free batch slots are handed out one per user in turn, so a
user with one request joins at the next step boundary however much others have queued.
Per-user and total caps bound the memory that waiting requests hold.

Cancelled and expired requests are failed at the next `take`, but the queue is only swept
when some request was cancelled since the last sweep or the oldest one has waited too long:
a sweep at every decode step cost O(waiting) each step, a quarter of the engine thread's
time with thousands waiting, just when it was already behind.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from .requests import EngineOverloaded, RequestCancelled, RequestHandle

ANONYMOUS = ""  # the queue of requests without a user (no store id is empty)


class FairQueue:
    """Per-user FIFOs; `take(n)` admits up to n handles round-robin, starting after the last user served."""

    def __init__(self, max_total: int, max_per_user: int, max_wait_s: float) -> None:
        self.max_total, self.max_per_user, self.max_wait_s = max_total, max_per_user, max_wait_s
        self._queues: OrderedDict[str, deque[RequestHandle]] = OrderedDict()  # next user to serve first
        self._size = 0
        # every handle in the order it was added, the ones no longer waiting dropped lazily from
        # the front, where the longest-waiting one is
        self._arrivals: deque[RequestHandle] = deque()
        self._cancelled = False  # a waiting handle may have been cancelled since the last sweep

    def __len__(self) -> int:
        return self._size

    def add(self, handles: list[RequestHandle], bounded: bool = True) -> None:
        """Queue handles (all or none); EngineOverloaded if a cap would be passed. Unbounded
        (an offline caller's own batch): no cap applies and none of them expires."""
        if bounded and self._size + len(handles) > self.max_total:
            raise EngineOverloaded(
                f"the queue is full ({self._size} of {self.max_total} requests waiting); retry later"
            )
        wanted: dict[str, int] = {}
        for handle in handles:
            wanted[_owner(handle)] = wanted.get(_owner(handle), 0) + 1
        for owner, count in wanted.items():
            waiting = len(self._queues.get(owner, ()))
            if bounded and waiting + count > self.max_per_user:
                who = "anonymous requests" if owner == ANONYMOUS else f"user {owner!r}"
                raise EngineOverloaded(
                    f"{who} already have {waiting} of {self.max_per_user} requests waiting; retry later"
                )
        now = time.monotonic() if bounded else math.inf  # the wait for a slot starts here, not at an unlock
        for handle in handles:
            self._queues.setdefault(_owner(handle), deque()).append(handle)
            handle.waiting, handle.queued_at = True, now
            handle.on_cancel = self._note_cancel
        if bounded:  # the others never expire: the oldest-waiting check must not see them
            self._arrivals.extend(handles)
        self._size += len(handles)

    def take(self, room: int, fits: Callable[[RequestHandle], bool] | None = None) -> list[RequestHandle]:
        """Up to `room` handles, one per user in turn, stopping at the first that `fits` refuses (it
        stays first in turn, so smaller requests do not pass it); expired and cancelled ones are
        failed on the way."""
        now = time.monotonic()
        if self._cancelled or now - self._oldest_queued_at(now) > self.max_wait_s:
            self._drop_dead(now)
        taken: list[RequestHandle] = []
        while room > len(taken) and self._queues:
            owner, queue = next(iter(self._queues.items()))
            if fits is not None and not fits(queue[0]):
                break
            taken.append(_leave(queue.popleft()))
            self._size -= 1
            del self._queues[owner]
            if queue:  # the user goes to the back of the round
                self._queues[owner] = queue
        return taken

    def drain(self) -> list[RequestHandle]:
        """Every waiting handle, the queue emptied."""
        handles = [_leave(h) for queue in self._queues.values() for h in queue]
        self._queues.clear()
        self._arrivals.clear()
        self._size = 0
        return handles

    def _note_cancel(self) -> None:  # on the canceller's thread: one assignment, no lock needed
        self._cancelled = True

    def _oldest_queued_at(self, now: float) -> float:
        """When the longest-waiting handle was queued (`now` if none waits)."""
        while self._arrivals and not self._arrivals[0].waiting:
            self._arrivals.popleft()
        return self._arrivals[0].queued_at if self._arrivals else now

    def _drop_dead(self, now: float) -> None:
        """Fail the cancelled handles and those that waited longer than max_wait_s."""
        self._cancelled = False  # before the sweep: a cancel during it asks for the next one
        for owner in list(self._queues):
            queue = self._queues[owner]
            alive = deque()
            for handle in queue:
                if handle.cancelled:
                    handle._fail(RequestCancelled("cancelled before it started"))
                elif now - handle.queued_at > self.max_wait_s:
                    handle._fail(
                        EngineOverloaded(f"waited more than {self.max_wait_s:g} s for a batch slot; retry later")
                    )
                else:
                    alive.append(handle)
                    continue
                _leave(handle)
            self._size -= len(queue) - len(alive)
            if alive:
                self._queues[owner] = alive
            else:
                del self._queues[owner]


def _leave(handle: RequestHandle) -> RequestHandle:
    """`handle` is no longer waiting: the queue stops hearing of its cancel."""
    handle.waiting, handle.on_cancel = False, None
    return handle


def _owner(handle: RequestHandle) -> str:
    return handle.request.user or ANONYMOUS
