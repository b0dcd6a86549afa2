"""The running batch of the engine, and one step over it.

Rows being generated share one KV cache (per layer (B, H, T, D), each row
[masked left padding | prefix | prompt | generated], a mask (B, T) marking real slots);
joiners whose prompts are still being read wait in `filling`. One step is one forward:
a decode step of every running row fused with a chunk of at most `max_prefill_tokens`
prompt tokens of the joiners (chunked prefill, as in vLLM: a burst of long prompts
cannot stall the running streams for longer than one chunk). A joiner starts behind its
prefix and whatever its owner has cached of the prompt (prompt_cache.py); rows that finish
leave their prompt + reply KV in that cache for the user's next turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from fedprefix.common.attention import cache_layers, drop_rows, join_rows, rewind, row_key_values, stack_prefixes
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.generation import left_pad, make_generator

from .fast_llama import Decode, Prefill
from .kv_budget import KvBudget, reach
from .prompt_cache import PromptCache
from .requests import EngineStats, InvalidRequest, RequestCancelled, RequestHandle
from .rows import Filling, Row, pick, take_token, text_decoder

log = logging.getLogger(__name__)


class RunningBatch:
    """Rows being generated, joiners being prefilled, and the step that advances them all."""

    def __init__(
        self,
        base,
        forward,
        stats: EngineStats,
        eos: set[int],
        prompts: PromptCache | None,
        max_prefill_tokens: int,
        max_rows: int,
        budget: KvBudget | None = None,
    ) -> None:
        self.base, self.tokenizer, self.forward = base, base.tokenizer, forward
        self.decode = text_decoder(base.tokenizer)
        self.stats, self.eos, self.prompts = stats, eos, prompts
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens computed per step
        self.max_rows = max_rows  # the most rows the cache makes room for
        self.budget = budget  # bounds rows x slots of the cache (None: no bound)
        self.rows: list[Row] = []
        self.cache = None  # a transformers Cache of GrowingLayers, (B, H, T, D) per layer
        self.mask: torch.Tensor | None = None  # (B, T)
        self.filling: list[Filling] = []  # admitted, prompt not yet fully read (first come first served)
        self._last_decode: float | None = None  # when the last decode step ended, and its rows (token gaps)
        self._last_rows: set[int] = set()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.filling)

    @property
    def slots(self) -> int:
        """Batch slots taken: running rows and joiners still prefilling."""
        return len(self.rows) + len(self.filling)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the batch's KV cache buffers, spare room included."""
        cache = self.cache  # once: the scheduler thread may drop it meanwhile
        if cache is None:
            return 0
        return sum(2 * layer._keys.numel() * layer._keys.element_size() for layer in cache.layers)

    def admission(self) -> Callable[[RequestHandle], bool]:
        """A check for the queue's next requests, in turn: does one more fit beside the batch and
        those it accepted before? (Within the KV budget: see kv_budget.py.)"""
        if self.budget is None:
            return lambda handle: True
        handles = self._handles()
        rows, widest = len(handles), max((reach(h) for h in handles), default=0)

        def fits(handle: RequestHandle) -> bool:
            nonlocal rows, widest
            wider = max(widest, reach(handle))
            if not self.budget.fits(rows + 1, wider):
                return False
            rows, widest = rows + 1, wider
            return True

        return fits

    def _handles(self) -> list[RequestHandle]:
        """The requests in the batch: joiners still prefilling, then running rows."""
        return [f.handle for f in self.filling] + [row.handle for row in self.rows]

    def fail_all(self, error: BaseException) -> None:
        """End every request in the batch with `error` and empty it."""
        for handle in self._handles():
            handle._fail(error)
        self.rows, self.cache, self.mask, self.filling = [], None, None, []
        self._released()

    def step(self, joiners: list[RequestHandle]) -> None:
        try:
            with torch.no_grad():
                self.drop_done()  # cancelled rows leave before the next forward
                self.filling.extend(self.admit(handle) for handle in joiners)
                plan = self.plan_chunk()
                if plan or self.rows:
                    self._forward_step(plan)
        except Exception as exc:  # the batch's shared state is unknown now: end it, never the server
            log.exception("engine step failed")
            self.fail_all(FedPrefixError(f"generation failed: {exc}"))

    def admit(self, handle: RequestHandle) -> Filling:
        """A joiner starts behind its prefix and the longest prompt prefix its owner has cached."""
        done, cached = 0, None
        if self.prompts is not None and handle.owner is not None:
            done, cached = self.prompts.match(handle.owner, handle.prompt_ids)
        context = handle.prefix if cached is None else torch.cat([handle.prefix, cached], dim=3)
        return Filling(handle, context, done)

    def plan_chunk(self) -> list[tuple[Filling, int]]:
        """Prompt tokens to prefill this step, first come first served, at most max_prefill_tokens."""
        plan, budget = [], self.max_prefill_tokens
        for filling in self.filling:
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
        decode = self._decode_inputs() if self.rows else None
        lengths = [layer.length for layer in self.cache.layers] if decode is not None else None
        try:
            chunk = self._chunk_inputs(plan) if plan else None
            filled, logits = self.forward.step(chunk, decode)
        except Exception:
            if not plan:
                raise  # a failed decode step ends the batch (_step)
            log.exception("fused step failed; redoing it row by row")
            if decode is not None:
                rewind(self.cache, lengths)
                self._decoded(decode, self.forward.step(None, decode)[1])
            for item in plan:
                try:
                    chunk = self._chunk_inputs([item])
                    self._filled([item], chunk, self.forward.step(chunk, None)[0])
                except Exception as exc:
                    log.exception("prefill failed (request %s)", item[0].handle.request.request_id)
                    item[0].handle._fail(FedPrefixError(f"generation failed: {exc}"))
            self.filling = [f for f in self.filling if not f.handle.done]
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
                filling.extend(row_key_values(layers, i, slice(width - count, width)))  # (L, 2, H, count, D)
            if finishing:
                complete.append(i)
                if self._remembers(handle):
                    self.prompts.store(handle.owner, handle.prompt_ids, filling.prompt_key_values())
        self.stats.prefill_tokens += sum(count for _, count in plan)
        if not complete:
            return
        device = self.mask.device if self.mask is not None else chunk.input_ids.device
        index = torch.tensor(complete, dtype=torch.long, device=device)
        new_mask = torch.cat([chunk.prefixes.mask, chunk.attention_mask.long()], dim=1)  # (B_p, Pmax + T)
        positions = (chunk.prefixes.lengths + chunk.attention_mask.sum(dim=1)).tolist()
        joined = [plan[i][0] for i in complete]
        rows = [self._new_row(f.handle, int(positions[i]), device) for f, i in zip(joined, complete, strict=True)]
        tokens = pick(logits.index_select(0, index), rows)
        # into the cache's spare rows: the running rows are not copied
        slots = None if self.budget is None else self.budget.slots
        self.cache, self.mask = join_rows(self.cache, self.mask, layers, new_mask, index, self.max_rows, slots)
        self.filling = [f for f in self.filling if f not in joined]
        self.rows.extend(rows)
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
        batch = len(self.rows)
        device = self.mask.device
        last = torch.tensor([[row.tokens[-1]] for row in self.rows], device=device)  # (B, 1)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)  # (B, 1)
        mask = torch.cat([self.mask, torch.ones(batch, 1, dtype=self.mask.dtype, device=device)], dim=1)
        return Decode(last, mask, positions, self.cache)

    def _decoded(self, decode: Decode, logits: torch.Tensor) -> None:
        """After a decode step (the cache already holds its new slot): the rows take their tokens."""
        self.mask = decode.attention_mask
        for row in self.rows:
            row.position += 1
        now, running = time.monotonic(), {id(row) for row in self.rows}
        if self._last_decode is not None and self._last_rows & running:
            self.stats.token_gaps.append(now - self._last_decode)
        self._last_decode, self._last_rows = now, running
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(self.rows))
        self.stats.token_times.append((now, self.stats.tokens))
        self._accept(pick(logits, self.rows), self.rows)

    def _remembers(self, handle: RequestHandle) -> bool:
        """Whether KV of this request's tokens is cached for its owner's next requests."""
        return self.prompts is not None and handle.owner is not None

    def _accept(self, tokens: list[int | None], rows: list[Row]) -> None:
        """Give each of `rows` its new token; finished and failed rows leave the batch."""
        for row, token in zip(rows, tokens, strict=True):
            if token is None or row.handle.done:
                continue
            try:
                take_token(row, token, self.decode, self.eos, self.stats)
            except Exception as exc:  # decoding or stop handling of this row only
                log.exception("a row failed (request %s)", row.handle.request.request_id)
                row.handle._fail(FedPrefixError(f"generation failed: {exc}"))
        self.drop_done()

    def drop_done(self) -> None:
        """Remove finished, failed and cancelled rows from the batch and its cache (and joiners still filling)."""
        for filling in self.filling:
            if filling.handle.cancelled:
                filling.handle._fail(RequestCancelled("cancelled while its prompt was read"))
        self.filling = [f for f in self.filling if not f.handle.done]
        for row in self.rows:
            if row.handle.cancelled:
                row.handle._fail(RequestCancelled("cancelled while generating"))
        keep = [i for i, row in enumerate(self.rows) if not row.handle.done]
        if len(keep) < len(self.rows):
            self._remember_finished([i for i, row in enumerate(self.rows) if row.handle.done])
            if keep:  # in place: each leaving row's slot is filled by one of the last rows
                self.cache, self.mask, order = drop_rows(self.cache, self.mask, keep)
                self.rows = [self.rows[i] for i in order]
            else:
                self.rows, self.cache, self.mask = [], None, None
                self._released()

    def _released(self) -> None:
        """The batch's cache is gone: a forward that holds its buffers (CUDA graphs) lets them go."""
        release = getattr(self.forward, "release", None)
        if release is not None:
            release()

    def _remember_finished(self, leaving: list[int]) -> None:
        """Cache the KV of prompt + fed tokens of rows that finished well: a chat's next turn reuses it."""
        layers = cache_layers(self.cache)
        for i in leaving:
            row = self.rows[i]
            if not self._remembers(row.handle) or row.handle.finish_reason in (None, "error"):
                continue
            slots = self.mask[i].nonzero().squeeze(1)[row.handle.prefix.shape[3] :]  # prompt + fed tokens
            tokens = (row.handle.prompt_ids + row.tokens)[: len(slots)]
            if len(tokens) < len(slots):  # cannot happen; never store KV under the wrong tokens
                continue
            self.prompts.store(row.handle.owner, tokens, row_key_values(layers, i, slots))  # (L, 2, H, n, D)
