"""Continuous batching over one base model, each row behind its own user's prefix.

Iteration-level scheduling (Orca, vLLM): between two decode steps, finished requests
leave the batch and queued ones join it. A joining group is prefilled in one forward
(prompt behind prefix, left-padded), then its rows are appended to the running batch's
KV cache; every row keeps its own mask and position counter, so its tokens equal what
that user gets alone (greedy: token for token; sampling: same seed, same tokens).

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
import time
from collections.abc import Callable, Sequence

import torch
from fedprefix.common.attention import (
    batch_cache,
    cache_layers,
    drop_rows,
    rewind,
    stack_prefixes,
)
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.generation import eos_ids, left_pad, make_generator
from fedprefix.common.store import PrefixStore

from .fast_llama import Decode, Prefill, serving_forward
from .prefix_cache import PrefixCache
from .prompt_cache import PromptCache
from .requests import (  # re-exported: the engine's public names
    EngineOverloaded,  # noqa: F401
    EngineStats,
    EngineStopped,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    RequestCancelled,
    RequestHandle,
)
from .rows import Filling, Row, pick, take_token
from .scheduler import FairQueue
from .unlock import UnlockGuard

log = logging.getLogger(__name__)


class Engine:
    """One base, many users' prefixes, continuous batching.

    Waiting requests queue per user and join the batch round-robin across users
    (scheduler.py); `max_queue_per_user` (default: max_queue) caps one user's waiting
    requests, anonymous ones counting as one user. Passphrase unlocks run under
    `unlock_guard` (unlock.py). A request that fails (a bad row, a cancelled one) leaves
    the batch alone; its batch mates go on.
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
    ) -> None:
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
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
        self.prompts = PromptCache(prompt_cache_bytes) if store is not None and prompt_cache_bytes > 0 else None
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens computed per step (chunked prefill)
        self.context_length = context_length(self.model)
        self.max_batch_size = max_batch_size
        self._forward = serving_forward(self.model, max_batch_size)
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.continuous = continuous
        self.stats = EngineStats()
        self._eos = eos_ids(self.model, self.tokenizer)
        self._pending = FairQueue(
            max_queue, max_queue if max_queue_per_user is None else max_queue_per_user, max_wait_s
        )
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None  # the background thread of start(), if any
        self._runner: threading.Thread | None = None  # the thread running the scheduler now
        self._running = False
        self._stopping = False
        self._threads = torch.get_num_threads()  # the creating thread's setting, applied where the scheduler runs
        # running batch: rows, their KV cache (grows in place) and mask (B, T)
        self._rows: list[Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._filling: list[Filling] = []  # admitted, prompt not yet fully prefilled (first come first served)
        self._last_decode: float | None = None  # when the last decode step ended, and its rows (token gaps)
        self._last_rows: set[int] = set()

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
    def batch_size(self) -> int:
        return len(self._rows)

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
            raise FedPrefixError("this engine has no prefix store; requests must not name a user")
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
        on an engine that is not running, on the calling thread (offline batch inference)."""
        if not self._claim():
            return [h.result() for h in self.submit_many(requests)]
        try:
            handles = self._enqueue([self._prepare(r) for r in requests])
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
        or prompt + prefix + max_new_tokens longer than the base's context."""
        if isinstance(request.prompt, str):
            prompt_ids = self.tokenizer(request.prompt, add_special_tokens=False).input_ids
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
        """Refuse (or, with fit_context, shorten) a request that would run past the base's positions."""
        if self.context_length is None:
            return
        room = self.context_length - prefix_tokens - prompt_tokens
        wanted = request.params.max_new_tokens
        if request.fit_context and room >= 1 and wanted > room:
            request.params = request.params.model_copy(update={"max_new_tokens": room})
        elif wanted > room:
            mine = f" + {prefix_tokens} prefix tokens" if prefix_tokens else ""
            raise InvalidRequest(
                "prompt",
                f"{prompt_tokens} prompt tokens{mine} + max_tokens {wanted} exceed the base's context of "
                f"{self.context_length} tokens: shorten the prompt or lower max_tokens",
            )

    def _enqueue(self, handles: list[RequestHandle]) -> list[RequestHandle]:
        with self._wake:
            self._pending.add(handles)
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
                    while not (self._stopping or self._pending or self._rows or self._filling or (until and until())):
                        self._wake.wait(timeout=0.5)
                    if self._stopping or (until is not None and until()):
                        return
                    joiners = self._take_joiners()
                self._step(joiners)
        finally:
            with self._wake:
                unfinished = self._pending.drain() + [f.handle for f in self._filling] + [r.handle for r in self._rows]
                for handle in unfinished:
                    handle._fail(EngineStopped("the engine stopped before this request finished"))
                self._rows, self._cache, self._mask, self._filling = [], None, None, []
                self._running, self._runner = False, None
                self._wake.notify_all()

    def _step(self, joiners: list[RequestHandle]) -> None:
        try:
            with torch.no_grad():
                self._drop_done()  # cancelled rows leave before the next forward
                self._filling.extend(self._admit(handle) for handle in joiners)
                plan = self._plan_chunk()
                if plan or self._rows:
                    self._forward_step(plan)
        except Exception as exc:  # the batch's shared state is unknown now: end it, never the server
            log.exception("engine step failed")
            for handle in [f.handle for f in self._filling] + [row.handle for row in self._rows]:
                handle._fail(FedPrefixError(f"generation failed: {exc}"))
            self._rows, self._cache, self._mask, self._filling = [], None, None, []

    def _take_joiners(self) -> list[RequestHandle]:
        """Queued requests that join now: at any step boundary (continuous) or into an empty batch."""
        if not self.continuous and (self._rows or self._filling):
            self._pending.take(0)  # still fail the expired and the cancelled
            return []
        return self._pending.take(self.max_batch_size - len(self._rows) - len(self._filling))

    def _admit(self, handle: RequestHandle) -> Filling:
        """A joiner starts behind its prefix and the longest prompt prefix its owner has cached."""
        done, cached = 0, None
        if self.prompts is not None and handle.owner is not None:
            done, cached = self.prompts.match(handle.owner, handle.prompt_ids)
        context = handle.prefix if cached is None else torch.cat([handle.prefix, cached], dim=3)
        return Filling(handle, context, done)

    def _plan_chunk(self) -> list[tuple[Filling, int]]:
        """Prompt tokens to prefill this step, first come first served, at most max_prefill_tokens."""
        plan, budget = [], self.max_prefill_tokens
        for filling in self._filling:
            if budget <= 0:
                break
            count = min(len(filling.handle.prompt_ids) - filling.done, budget)
            plan.append((filling, count))
            budget -= count
        return plan

    def _forward_step(self, plan: list[tuple[Filling, int]]) -> None:
        """One forward: a decode step of the running rows fused with a prefill chunk of joiners.

        If it fails with a chunk in it, the running rows' cache is rewound and the step
        is redone in parts (decode alone, then each joiner's chunk alone), so that only a
        joiner whose own chunk fails fails.
        """
        decode = self._decode_inputs() if self._rows else None
        lengths = [layer.length for layer in self._cache.layers] if decode is not None else None
        try:
            chunk = self._chunk_inputs(plan) if plan else None
            filled, logits = self._forward.step(chunk, decode)
        except Exception:
            if not plan:
                raise  # a failed decode step ends the batch (_step)
            log.exception("fused step failed; redoing it row by row")
            if decode is not None:
                rewind(self._cache, lengths)
                self._decoded(decode, self._forward.step(None, decode)[1])
            for item in plan:
                try:
                    chunk = self._chunk_inputs([item])
                    self._filled([item], chunk, self._forward.step(chunk, None)[0])
                except Exception as exc:
                    log.exception("prefill failed")
                    item[0].handle._fail(FedPrefixError(f"generation failed: {exc}"))
            self._filling = [f for f in self._filling if not f.handle.done]
            return
        if decode is not None:
            self._decoded(decode, logits)
        if plan:
            self._filled(plan, chunk, filled)

    def _chunk_inputs(self, plan: list[tuple[Filling, int]]) -> Prefill:
        """The next `count` prompt tokens of each planned joiner (left-padded) behind its context."""
        device, dtype = self.base.device, self.base.dtype
        pieces = [f.handle.prompt_ids[f.done : f.done + count] for f, count in plan]
        ids, mask = left_pad(pieces, self.tokenizer.pad_token_id)
        prefixes = stack_prefixes([f.context for f, _ in plan], dtype=dtype, device=device)
        return Prefill(ids.to(device), mask.to(device), prefixes)

    def _filled(self, plan: list[tuple[Filling, int]], chunk: Prefill, filled) -> None:
        """After a chunk: joiners with their whole prompt in join the batch; the others keep its KV."""
        logits, layers = filled  # (B_p, V), per layer (keys, values) each (B_p, H, Pmax + T, D)
        width = layers[0][0].shape[2]
        complete = []
        for i, (filling, count) in enumerate(plan):
            handle = filling.handle
            finishing = filling.done + count == len(handle.prompt_ids)
            if finishing and not self._remembers(handle):
                filling.done += count  # its KV joins the batch below; no copy needed
            else:
                piece = torch.stack(
                    [torch.stack([k[i, :, width - count :], v[i, :, width - count :]]) for k, v in layers]
                )
                filling.extend(piece)  # (L, 2, H, count, D)
            if finishing:
                complete.append(i)
                if self._remembers(handle):
                    self.prompts.store(handle.owner, handle.prompt_ids, filling.prompt_key_values())
        self.stats.prefill_tokens += sum(count for _, count in plan)
        if not complete:
            return
        device = self._mask.device if self._mask is not None else chunk.input_ids.device
        index = torch.tensor(complete, dtype=torch.long, device=device)
        new_mask = torch.cat([chunk.prefixes.mask, chunk.attention_mask.long()], dim=1)  # (B_p, Pmax + T)
        positions = (chunk.prefixes.lengths + chunk.attention_mask.sum(dim=1)).tolist()
        joined = [plan[i][0] for i in complete]
        rows = [self._new_row(f.handle, int(positions[i]), device) for f, i in zip(joined, complete, strict=True)]
        tokens = pick(logits.index_select(0, index), rows)
        running = [(cache_layers(self._cache), self._mask, None)] if self._rows else []
        self._cache, self._mask = batch_cache([*running, (layers, new_mask, index)])  # one copy
        self._filling = [f for f in self._filling if f not in joined]
        self._rows.extend(rows)
        self._accept(tokens, rows)

    def _new_row(self, handle: RequestHandle, position: int, device) -> Row:
        params = handle.request.params
        try:
            return Row(handle, params, make_generator(params, device), position=position)
        except Exception as exc:  # a seed torch refuses: this row fails, greedy until it leaves
            handle._fail(InvalidRequest("seed", f"cannot seed the sampler: {exc}"))
            return Row(handle, params.model_copy(update={"temperature": 0.0}), None, position=position)

    def _decode_inputs(self) -> Decode:
        """Each running row's last token, at its next position, over the batch's cache."""
        batch = len(self._rows)
        device = self._mask.device
        last = torch.tensor([[row.tokens[-1]] for row in self._rows], device=device)  # (B, 1)
        positions = torch.tensor([[row.position] for row in self._rows], device=device)  # (B, 1)
        mask = torch.cat([self._mask, torch.ones(batch, 1, dtype=self._mask.dtype, device=device)], dim=1)
        return Decode(last, mask, positions, self._cache)

    def _decoded(self, decode: Decode, logits: torch.Tensor) -> None:
        """After a decode step (the cache already holds its new slot): the rows take their tokens."""
        self._mask = decode.attention_mask
        for row in self._rows:
            row.position += 1
        now = time.monotonic()
        if self._last_decode is not None and self._last_rows & {id(row) for row in self._rows}:
            self.stats.token_gaps.append(now - self._last_decode)
        self._last_decode, self._last_rows = now, {id(row) for row in self._rows}
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(self._rows))
        self.stats.token_times.append((now, self.stats.tokens))
        self._accept(pick(logits, self._rows), self._rows)

    def _remembers(self, handle: RequestHandle) -> bool:
        """Whether KV of this request's tokens is cached for its owner's next requests."""
        return self.prompts is not None and handle.owner is not None

    def _accept(self, tokens: list[int | None], rows: list[Row]) -> None:
        """Give each of `rows` its new token; finished and failed rows leave the batch."""
        for row, token in zip(rows, tokens, strict=True):
            if token is None or row.handle.done:
                continue
            try:
                take_token(row, token, self.tokenizer, self._eos, self.stats)
            except Exception as exc:  # decoding or stop handling of this row only
                log.exception("a row failed")
                row.handle._fail(FedPrefixError(f"generation failed: {exc}"))
        self._drop_done()

    def _drop_done(self) -> None:
        """Remove finished, failed and cancelled rows from the batch and its cache (and joiners still filling)."""
        for filling in self._filling:
            if filling.handle.cancelled:
                filling.handle._fail(RequestCancelled("cancelled while its prompt was read"))
        self._filling = [f for f in self._filling if not f.handle.done]
        for row in self._rows:
            if row.handle.cancelled:
                row.handle._fail(RequestCancelled("cancelled while generating"))
        keep = [i for i, row in enumerate(self._rows) if not row.handle.done]
        if len(keep) < len(self._rows):
            self._remember_finished([i for i in range(len(self._rows)) if i not in set(keep)])
            self._rows = [self._rows[i] for i in keep]
            if self._rows:
                index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
                self._cache, self._mask = drop_rows(self._cache, self._mask, index)  # in place
            else:
                self._cache, self._mask = None, None

    def _remember_finished(self, leaving: list[int]) -> None:
        """Cache the KV of prompt + fed tokens of rows that finished well: a chat's next turn reuses it."""
        layers = cache_layers(self._cache)
        for i in leaving:
            row = self._rows[i]
            if not self._remembers(row.handle) or row.handle.finish_reason in (None, "error"):
                continue
            slots = self._mask[i].nonzero().squeeze(1)[row.handle.prefix.shape[3] :]  # prompt + fed tokens
            tokens = (row.handle.prompt_ids + row.tokens)[: len(slots)]
            if len(tokens) < len(slots):  # cannot happen; never store KV under the wrong tokens
                continue
            kv = torch.stack(
                [torch.stack([k[i].index_select(1, slots), v[i].index_select(1, slots)]) for k, v in layers]
            )
            self.prompts.store(row.handle.owner, tokens, kv)  # (L, 2, H, n, D)


def context_length(model) -> int | None:
    """Positions the base can attend over (config max_position_embeddings or n_positions), if known."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
