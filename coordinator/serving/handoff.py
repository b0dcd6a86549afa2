"""From the engine's thread to the HTTP server's event loop: every row's text piece of a step
delivered with one wake-up of the loop.

`loop.call_soon_threadsafe` per piece wrote to the loop's wake-up pipe and woke it once per
running row at every step (64 system calls and 64 callbacks for a 64-row step), on the
engine's thread, between its steps. Here the first piece since the loop last drained
schedules one delivery; the pieces that follow before it runs join the same delivery.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class LoopHandoff:
    """Puts items on asyncio queues of one event loop from any thread, batched per wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def listener(self, queue: asyncio.Queue, pieces: bool = True) -> Callable[[object], None]:
        """A callable for the engine (RequestHandle's listener): put `item` on `queue`, soon.

        pieces=False: only the None that ends a request is put, for a caller that waits for the
        result and would otherwise be woken for every text piece."""
        if pieces:
            return lambda item: self._put(queue, item)
        return lambda item: None if item is not None else self._put(queue, None)

    def _put(self, queue: asyncio.Queue, item: object) -> None:
        with self._lock:
            self._items.append((queue, item))
            first = len(self._items) == 1
        if first:  # a delivery not yet scheduled (the loop swaps the list out before it delivers)
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
