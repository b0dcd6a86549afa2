"""What a request to the serving engine is, and how its caller follows it.

`GenerationRequest` goes in; a `RequestHandle` comes back at once, streaming text pieces
(`deltas()`) or waiting for the `GenerationResult`. The engine fills the handle from its
scheduler thread; a caller may be any thread, or an async server that passes a listener.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.generation import SamplingParams


class EngineOverloaded(FedPrefixError):
    """The queue is full or a request waited too long for a batch slot: try again later (HTTP 429)."""


class EngineStopped(FedPrefixError):
    """The engine is not running."""


class RequestCancelled(FedPrefixError):
    """The caller cancelled the request (its client went away)."""


class InvalidRequest(FedPrefixError, ValueError):
    """A request the engine cannot run as given (HTTP 400); `field` names the part that is wrong,
    `code` the kind (the error code of OpenAI's answer)."""

    code = "invalid_body"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ContextLengthExceeded(InvalidRequest):
    """Prompt and max_tokens past what one request may hold: OpenAI's and vLLM's 400
    `context_length_exceeded`, which clients catch to trim a chat's history and try again."""

    code = "context_length_exceeded"


@dataclass
class GenerationRequest:
    """One completion: a prompt (text as the model should see it, or token ids) for a user."""

    prompt: str | list[int]
    user: str | None = None  # None: the base with no prefix
    key: bytes | str | None = field(default=None, repr=False)  # the user's key: 32 raw bytes or a passphrase
    params: SamplingParams = field(default_factory=SamplingParams)
    # True: a max_new_tokens that does not fit the context is lowered to fit (a default the
    # caller did not choose); False: the request is refused (InvalidRequest)
    fit_context: bool = False
    # True: `prompt` is text a chat template wrote, with its own special tokens (no BOS added)
    templated: bool = False
    request_id: str | None = None  # the HTTP request's X-Request-Id, which the engine's log names


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int


class RequestHandle:
    """A submitted request: iterate `deltas()` to stream, or `result()` to wait."""

    def __init__(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        prefix: torch.Tensor | None,
        listener: Callable[[str | None], None] | None = None,
    ) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.prefix = prefix
        self.owner = None  # whose prefix this is (prefix_cache.Owner): what cached KV is keyed by
        self._events: queue.Queue = queue.Queue()
        # An async server passes a listener (thread-safe hand-off to its event loop)
        # instead of blocking a thread per request on the queue.
        self._put = listener or self._events.put
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self.waiting = False  # in the engine's queue (scheduler.py), since queued_at (monotonic s)
        self.queued_at = 0.0
        self.on_cancel: Callable[[], None] | None = None  # the queue's, while it waits there

    def cancel(self) -> None:
        """Stop this request (any thread): it leaves the queue or the batch before the next
        decode step and fails with RequestCancelled; a finished request stays finished."""
        self._cancelled = True
        if (tell := self.on_cancel) is not None:
            tell()

    @property
    def cancelled(self) -> bool:
        return self._cancelled and not self.done

    def _emit(self, delta: str) -> None:
        if delta:
            self._put(delta)

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()
        self._put(None)

    def _fail(self, error: BaseException) -> None:
        if self.done:  # the first outcome stands
            return
        self._error = error
        self._done.set()
        self._put(None)

    def deltas(self) -> Iterator[str]:
        """Text pieces as they are produced; joined, they are exactly `result().text` (no listener)."""
        while (item := self._events.get()) is not None:
            yield item
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def finish_reason(self) -> str | None:
        """'stop' or 'length' once finished, 'error' if it failed, None while running."""
        if not self.done:
            return None
        return "error" if self._result is None else self._result.finish_reason


@dataclass
class EngineStats:
    """Counters the HTTP server exports as Prometheus metrics."""

    steps: int = 0
    tokens: int = 0
    finished: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (cached ones are not)
    # per decode step, drained by the metrics exporter; bounded so a server nobody scrapes does not grow
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=100_000))
    token_times: deque = field(default_factory=lambda: deque(maxlen=2048))  # (time, tokens so far) per step
    # seconds between two decode steps of rows running in both (the inter-token latency), drained by metrics
    token_gaps: deque = field(default_factory=lambda: deque(maxlen=100_000))

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self.token_times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        (t0, n0), (t1, n1) = recent[0], recent[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)
