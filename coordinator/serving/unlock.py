"""Bounds on unlocking prefixes with passphrases: memory, concurrency, and guessing.

Each passphrase unlock is a scrypt derivation (128 MiB and ~0.4 s at the store's default
cost), so unbounded concurrent wrong guesses would exhaust the server's memory. Two
guards, both answered HTTP 429 with Retry-After:

- at most `max_concurrent` derivations run at once; a request that cannot start one
  within `wait_s` is refused (memory stays below max_concurrent x 128 MiB);
- after `max_failures` wrong keys in a row for one user, that user's unlocks are
  refused for `backoff_s`, doubling with each further wrong key up to `max_backoff_s`;
  a right key clears the count. (Someone guessing can delay the owner's unlocks by that
  long, never learn more per second; an unlocked prefix stays cached and keeps serving.)
  A user's unlocks run one at a time, each after the outcome of the one before: a burst
  of concurrent guesses cannot all pass the backoff check before the first has failed.

Raw 32-byte keys cost no derivation and pass the concurrency guard freely (they still
take their turn among the user's unlocks).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from fedprefix.common.store import WrongKeyError

from .requests import EngineOverloaded

T = TypeVar("T")


class UnlockThrottled(EngineOverloaded):
    """Too many unlocks at once, or too many wrong keys for a user: retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Failures:
    count: int = 0
    blocked_until: float = 0.0


class UnlockGuard:
    """Runs unlocks under a concurrency bound and a per-user wrong-key backoff."""

    def __init__(
        self,
        max_concurrent: int = 4,
        wait_s: float = 2.0,
        max_failures: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 1 or max_failures < 1:
            raise ValueError(f"max_concurrent and max_failures must be >= 1, got {max_concurrent}, {max_failures}")
        self.max_concurrent, self.wait_s = max_concurrent, wait_s
        self.max_failures, self.backoff_s, self.max_backoff_s = max_failures, backoff_s, max_backoff_s
        self._clock = clock
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._failures: dict[str, _Failures] = {}  # only users that exist reach WrongKeyError
        self._turns: dict[str, list] = {}  # user -> [lock, holders and waiters]; gone when none are left
        self._lock = threading.Lock()

    def unlock(self, user: str, key: bytes | str, load: Callable[[], T]) -> T:
        """`load()` (an unlock of `user` with `key`), or UnlockThrottled; WrongKeyError counts a failure.

        `load` runs after the user's previous unlock ended, so it may first look for what
        that one left (a cached prefix) before deriving again."""
        with self._turn(user):
            self._check_backoff(user)
            with self._slot(key):
                try:
                    value = load()
                except WrongKeyError:
                    self._failed(user)
                    raise
            with self._lock:
                self._failures.pop(user, None)
            return value

    @contextmanager
    def _turn(self, user: str):
        """This user's unlocks one at a time (UnlockThrottled after `wait_s` in line)."""
        with self._lock:
            turn = self._turns.setdefault(user, [threading.Lock(), 0])
            turn[1] += 1
        try:
            if not turn[0].acquire(timeout=self.wait_s):
                raise UnlockThrottled(f"unlocks of user {user!r} are queued; retry shortly", retry_after=1.0)
            try:
                yield
            finally:
                turn[0].release()
        finally:
            with self._lock:
                turn[1] -= 1
                if turn[1] == 0:  # names that are guessed, not only real users, come through here
                    del self._turns[user]

    def _check_backoff(self, user: str) -> None:
        with self._lock:
            state = self._failures.get(user)
            wait = 0.0 if state is None else state.blocked_until - self._clock()
        if wait > 0:
            raise UnlockThrottled(
                f"too many wrong keys for user {user!r}: retry in {math.ceil(wait)} s", retry_after=wait
            )

    @contextmanager
    def _slot(self, key: bytes | str):
        if not isinstance(key, str):  # a raw key: no derivation
            yield
            return
        if not self._slots.acquire(timeout=self.wait_s):
            raise UnlockThrottled(
                f"{self.max_concurrent} passphrase unlocks are running; retry shortly", retry_after=1.0
            )
        try:
            yield
        finally:
            self._slots.release()

    def _failed(self, user: str) -> None:
        with self._lock:
            state = self._failures.setdefault(user, _Failures())
            state.count += 1
            over = state.count - self.max_failures
            if over >= 0:
                delay = min(self.backoff_s * 2.0**over, self.max_backoff_s)
                state.blocked_until = self._clock() + delay
