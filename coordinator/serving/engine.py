"""Continuous batching over one base model, each row behind its own user's prefix.

Iteration-level scheduling (Orca, vLLM): between two decode steps, finished requests
leave the batch and queued ones join it. Joiners' prompts are prefilled in chunks fused
into the decode steps, behind their prefixes and whatever each user's earlier requests
left in the prompt cache (batch.py), then their rows are appended to the running batch's
KV cache; every row keeps its own mask and position counter, so its tokens equal what
that user gets alone (greedy: token for token; sampling: same seed, same tokens), in float32;
in bfloat16 a batch's products round differently from one row's, and a near tie may differ.

    engine = Engine(load_base("tiny-llama"), store=PrefixStore("store"))
    results = engine.generate([GenerationRequest("Hello", user="alice", key=KEY)])  # on this thread

    with engine:  # a background scheduler: submit() from any thread, stream with deltas()
        print(engine.submit(GenerationRequest("Hello", user="alice", key=KEY)).result().text)

`run()` schedules on the calling thread instead (what `fedprefix serve` does, with HTTP on
another thread), which is faster on CPUs: see its docstring.

`continuous=False` gives static batching (a batch runs to its end before the next one
starts), for comparison.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch
from fedprefix.common import chat
from fedprefix.common.base_model import context_length
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.generation import eos_ids
from fedprefix.common.store import PrefixStore

from .batch import RunningBatch
from .fast_llama import serving_forward
from .kv_budget import FALLBACK_BYTES, MIB, KvBudget, auto_budget_bytes, slot_bytes
from .prefix_cache import PrefixCache
from .prompt_cache import PromptCache
from .requests import (  # re-exported: the engine's public names
    ContextLengthExceeded,
    EngineOverloaded,  # noqa: F401
    EngineStats,
    EngineStopped,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    RequestCancelled,  # noqa: F401
    RequestHandle,
)
from .scheduler import FairQueue
from .unlock import UnlockGuard

log = logging.getLogger(__name__)


class Engine:
    """One base, many users' prefixes, continuous batching.

    Waiting requests queue per user and join the batch round-robin across users
    (scheduler.py); `max_queue_per_user` (default: max_queue) caps one user's waiting
    requests, anonymous ones counting as one user. Passphrase unlocks run under
    `unlock_guard` (unlock.py). A request that fails (a bad row, a cancelled one) leaves
    the batch alone; its batch mates go on. `kv_cache_bytes` bounds the running batch's KV
    (kv_budget.py; None: a share of the memory free at start, split among `kv_cache_sharers`
    engines started alike on this machine).
    """

    def __init__(
        self,
        base,
        store: PrefixStore | None = None,
        max_batch_size: int = 64,
        max_queue: int = 256,
        max_wait_s: float = 30.0,
        continuous: bool = True,
        prefix_cache_bytes: int = 1 << 30,
        max_queue_per_user: int | None = None,
        unlock_guard: UnlockGuard | None = None,
        max_prefill_tokens: int = 2048,
        prompt_cache_bytes: int = 256 << 20,
        cuda_graphs: bool = True,
        kv_cache_bytes: int | None = None,
        kv_cache_sharers: int = 1,
    ) -> None:
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
        if kv_cache_sharers < 1:
            raise ValueError(f"kv_cache_sharers must be at least 1, got {kv_cache_sharers}")
        if store is not None and not isinstance(store, PrefixStore):  # a folder's name, say: never created here
            raise TypeError(f"store must be a PrefixStore (fedprefix.common.store), e.g. PrefixStore({str(store)!r})")
        self.base = base
        self.model, self.tokenizer = base.model, base.tokenizer
        self.store = store
        self.unlock_guard = unlock_guard or UnlockGuard()
        self.prefixes = (
            PrefixCache(
                store,
                base.fingerprint,
                prefix_cache_bytes,
                dtype=base.dtype,
                device=base.device,
                guard=self.unlock_guard,
            )
            if store is not None
            else None
        )
        # KV of users' earlier prompts (0 bytes: off); only behind a prefix, see prompt_cache.py
        self.prompts = (
            PromptCache(prompt_cache_bytes, current_version=self.prefixes.version)
            if self.prefixes is not None and prompt_cache_bytes > 0
            else None
        )
        self.context_length = context_length(self.model)
        self.kv_budget = self._kv_budget(kv_cache_bytes, prefix_cache_bytes, prompt_cache_bytes, kv_cache_sharers)
        self.bos = chat.leading_bos(self.tokenizer)  # before a text prompt, as Personalizer.fit and generate put it
        self.max_batch_size = max_batch_size
        self._forward = serving_forward(self.model, max_batch_size, cuda_graphs)
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.continuous = continuous
        self.stats = EngineStats()
        self._pending = FairQueue(
            max_queue, max_queue if max_queue_per_user is None else max_queue_per_user, max_wait_s
        )
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None  # the background thread of start(), if any
        self._runner: threading.Thread | None = None  # the thread running the scheduler now
        self._running = False
        self._stopping = False
        self._threads = torch.get_num_threads()  # the creating thread's setting, applied where the scheduler runs
        eos = eos_ids(self.model, self.tokenizer)
        self._batch = RunningBatch(  # touched by the scheduler thread only
            base, self._forward, self.stats, eos, self.prompts, max_prefill_tokens, max_batch_size, self.kv_budget
        )

    def _kv_budget(
        self, chosen: int | None, prefix_cache_bytes: int, prompt_cache_bytes: int, sharers: int
    ) -> KvBudget:
        """`chosen` bytes for the running batch's KV, or (None) a share of the memory free now,
        split among `sharers` engines alike on this machine (replicas: each reads the memory free as
        it starts, less as the others load), never less than one row of the base's whole context."""
        slot = slot_bytes(self.model.config, self.base.dtype)
        if chosen is not None:
            budget = KvBudget.of_bytes(chosen, slot)
            if budget.longest_alone() < 1:
                least = KvBudget(KvBudget.row_slots(1), slot)
                raise ValueError(
                    f"a KV cache budget of {max(chosen, 0) / MIB:.2f} MiB holds no request: one takes at least "
                    f"{least.bytes / MIB:.2f} MiB (kv_cache_bytes, --kv-cache-mib)"
                )
            return budget
        held = (prefix_cache_bytes if self.prefixes is not None else 0) + (prompt_cache_bytes if self.prompts else 0)
        free_share = auto_budget_bytes(torch.device(self.base.device), sharers * held)
        auto = KvBudget.of_bytes((FALLBACK_BYTES if free_share is None else free_share) // sharers, slot)
        one_row = KvBudget.row_slots(self.context_length) if self.context_length else 0
        return auto if auto.slots >= one_row else KvBudget(one_row, slot)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        """Run the scheduler on a background thread (see `run` for the faster main-thread way)."""
        if not self._claim():  # claimed before the thread starts: submit() may follow at once
            return self
        self._thread = threading.Thread(target=self._run, name="fedprefix-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the scheduler on the calling thread until `stop()` is called from elsewhere.

        `fedprefix serve` runs it on the main thread, the one that loaded the base. torch's
        OpenMP runtime (libgomp) stops spin-waiting once more threads own worker pools than
        there are cores, so a second computing thread pays a wake-up on every parallel
        operation, which made prefill and decode measurably slower on a background thread
        than on the main thread (figures: the serving benchmark's notes in the README).
        """
        if not self._claim():
            raise FedPrefixError("the engine is already running")
        self._run()

    def _claim(self) -> bool:
        """Mark the scheduler running, unless it already is (then False): one check-and-set, so
        that start(), run() and an offline generate() never run two schedulers."""
        with self._wake:
            if self._running:
                return False
            self._running, self._stopping = True, False
            return True

    def stop(self) -> None:
        """Stop the scheduler, wherever it runs; requests it had not finished fail with EngineStopped."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            if self._runner is not threading.current_thread():
                while self._running:
                    self._wake.wait(timeout=0.5)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._running

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def cuda_graphs(self) -> str | None:
        """On a GPU: 'on' while decode steps replay CUDA graphs, else why they run eagerly; None on a CPU."""
        if self.base.device.type != "cuda":
            return None
        if not hasattr(self._forward, "eager_reason"):
            return "off: turned off (--no-cuda-graphs) or a base served through transformers' forward"
        return self._forward.eager_reason or "on"

    @property
    def kv_bytes(self) -> int:
        """Bytes the running batch's KV cache holds now (read from another thread: a snapshot)."""
        return self._batch.kv_bytes

    @property
    def batch_size(self) -> int:
        """Requests in the batch: decoding, or still prefilling their prompt (chunked)."""
        return self._batch.slots

    # ------------------------------------------------------------------ requests

    def resolve_prefix(self, user: str | None, key: bytes | str | None) -> torch.Tensor | None:
        """The user's prefix (L, 2, H, P, D), unlocked with `key`; store errors propagate."""
        return self._lookup(user, key)[0]

    def forget_user(self, user: str) -> None:
        """Drop what this engine holds decrypted for `user` (prefix and prompt KV), e.g. when a router
        moves the user elsewhere; requests already running keep their own copy and finish."""
        if self.prefixes is not None:
            self.prefixes.forget(user)
        if self.prompts is not None:
            self.prompts.drop_user(user)

    def _lookup(self, user: str | None, key: bytes | str | None):
        """(the user's prefix, its Owner), or (None, None) without a user."""
        if user is None:
            return None, None
        if self.prefixes is None:
            raise InvalidRequest("user", "this engine has no prefix store; leave `user` out")
        return self.prefixes.lookup(user, key)

    def submit(self, request: GenerationRequest, listener: Callable[[str | None], None] | None = None) -> RequestHandle:
        """Queue a request; raises the store's errors (wrong key, unknown user) or EngineOverloaded.

        `listener`, if given, receives each text delta and then None at the end.
        """
        self._check_running()
        return self._enqueue([self._prepare(request, listener)])[0]

    def submit_many(
        self,
        requests: Sequence[GenerationRequest],
        listeners: Sequence[Callable[[str | None], None] | None] | None = None,
    ) -> list[RequestHandle]:
        """Queue requests together (all or none are queued); they join the same step where the
        batch has room and no other user waits, else round-robin with other users' requests."""
        self._check_running()
        listeners = [None] * len(requests) if listeners is None else listeners
        return self._enqueue([self._prepare(r, lis) for r, lis in zip(requests, listeners, strict=True)])

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` and wait for all of them: batched with whatever else is running, or,
        on an engine that is not running, on the calling thread (offline batch inference: the
        queue's caps and max_wait_s, there to protect a server, do not apply to them)."""
        if not self._claim():
            return [h.result() for h in self.submit_many(requests)]
        try:
            handles = self._enqueue([self._prepare(r) for r in requests], bounded=False)
        except BaseException:
            with self._wake:
                self._running = False
                self._wake.notify_all()
            raise
        self._run(until=lambda: all(h.done for h in handles))
        return [h.result() for h in handles]

    def _check_running(self) -> None:
        if not self._running or self._stopping:
            raise EngineStopped("the engine is not running; call start() or run(), or use it as a context manager")

    def _prepare(self, request: GenerationRequest, listener=None) -> RequestHandle:
        """Tokenize and check the request, then unlock the prefix, before taking the queue's lock.

        InvalidRequest names what is wrong: an empty prompt, token ids outside the vocabulary,
        or prompt + prefix + max_new_tokens longer than the base's context or the KV budget allows."""
        if isinstance(request.prompt, str):  # plain text gets the BOS training gave it (common/chat.py)
            prompt_ids = chat.prompt_ids(self.tokenizer, request.prompt, None if request.templated else self.bos)
        else:
            prompt_ids = list(request.prompt)
            vocab = self.model.get_input_embeddings().num_embeddings
            if any(type(t) is not int or not 0 <= t < vocab for t in prompt_ids):
                raise InvalidRequest("prompt", f"token ids must be integers in 0..{vocab - 1}")
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        self._fit_context(request, len(prompt_ids), 0)  # before any key derivation
        prefix, owner = self._lookup(request.user, request.key)
        if prefix is not None:
            self._fit_context(request, len(prompt_ids), prefix.shape[3])  # prefix (L, 2, H, P, D)
        handle = RequestHandle(request, prompt_ids, prefix, listener)
        handle.owner = owner
        return handle

    def _fit_context(self, request: GenerationRequest, prompt_tokens: int, prefix_tokens: int) -> None:
        """Refuse (or, with fit_context, shorten) a request that would run past the base's positions
        or past what one row may hold in the batch's KV budget."""
        limit = self.kv_budget.longest_alone()
        bound = (
            f"the {limit} tokens one request may hold in this server's KV cache budget of "
            f"{self.kv_budget.describe()} (--kv-cache-mib)"
        )
        if self.context_length is not None and self.context_length <= limit:
            limit, bound = self.context_length, f"the base's context of {self.context_length} tokens"
        room = limit - prefix_tokens - prompt_tokens
        wanted = request.params.max_new_tokens
        if request.fit_context and room >= 1 and wanted > room:
            request.params = request.params.model_copy(update={"max_new_tokens": room})
        elif wanted > room:
            mine = f" + {prefix_tokens} prefix tokens" if prefix_tokens else ""
            if request.fit_context:  # max_tokens was not the caller's: the prompt alone is too long
                raise ContextLengthExceeded(
                    "prompt",
                    f"maximum context length exceeded: {prompt_tokens} prompt tokens{mine} leave no room for a "
                    f"reply in {bound}: shorten the prompt",
                )
            raise ContextLengthExceeded(
                "prompt",
                f"maximum context length exceeded: {prompt_tokens} prompt tokens{mine} + max_tokens {wanted} "
                f"exceed {bound}: shorten the prompt or lower max_tokens",
            )

    def _enqueue(self, handles: list[RequestHandle], bounded: bool = True) -> list[RequestHandle]:
        with self._wake:
            self._pending.add(handles, bounded)
            self._wake.notify()
        return handles

    # ------------------------------------------------------------------ scheduler

    def _run(self, until: Callable[[], bool] | None = None) -> None:
        """The scheduler: between decode steps, finished rows leave and queued requests join."""
        # A thread that never called torch.set_num_threads ran every kernel slower,
        # although torch reports the same count.
        torch.set_num_threads(self._threads)
        self._runner = threading.current_thread()
        try:
            while True:
                with self._wake:
                    while not (self._stopping or self._pending or self._batch.busy or (until and until())):
                        self._wake.wait(timeout=0.5)
                    if self._stopping or (until is not None and until()):
                        return
                    joiners = self._take_joiners()
                self._batch.step(joiners)
        finally:
            with self._wake:
                stopped = EngineStopped("the engine stopped before this request finished")
                for handle in self._pending.drain():
                    handle._fail(stopped)
                self._batch.fail_all(stopped)
                self._running, self._runner = False, None
                self._wake.notify_all()

    def _take_joiners(self) -> list[RequestHandle]:
        """Queued requests that join now: at any step boundary (continuous) or into an empty batch."""
        if not self.continuous and self._batch.busy:
            self._pending.take(0)  # still fail the expired and the cancelled
            return []
        return self._pending.take(self.max_batch_size - self._batch.slots, self._batch.admission())
