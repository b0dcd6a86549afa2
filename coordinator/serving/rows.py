"""One row of the running batch, and what happens to it at each step: its next token
picked, streamed, or its end (EOS, a stop string, max tokens).

A row that fails here (its sampling, decoding or stop handling raises) fails alone: its
request gets the error and its batch mates go on (the engine's `_accept`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from fedprefix.common.errors import FedPrefixError
from fedprefix.common.generation import SamplingParams, pick_tokens, stop_index
from transformers import PreTrainedTokenizerBase, TokenizersBackend

from .requests import EngineStats, GenerationResult, RequestHandle

log = logging.getLogger(__name__)


@dataclass
class Row:
    """A request inside the running batch."""

    handle: RequestHandle
    params: SamplingParams
    generator: torch.Generator | None
    position: int  # position id of the next token fed to the model
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already streamed


@dataclass
class Filling:
    """A request admitted to the batch whose prompt is still being prefilled, chunk by chunk."""

    handle: RequestHandle
    context: torch.Tensor | None  # (L, 2, H, P + done, D): its prefix, then the KV of prompt_ids[:done]
    done: int  # prompt tokens whose KV is in context (from the prompt cache or earlier chunks)

    def extend(self, piece: torch.Tensor) -> None:
        """Append the KV (L, 2, H, n, D) of the next n prompt tokens."""
        self.context = piece if self.context is None else torch.cat([self.context, piece], dim=3)
        self.done += piece.shape[3]

    def prompt_key_values(self) -> torch.Tensor:
        """The KV (L, 2, H, done, D) of the prompt tokens read so far, without the prefix (a copy)."""
        prefix = 0 if self.handle.prefix is None else self.handle.prefix.shape[3]
        return self.context[:, :, :, prefix:].contiguous()


def pick(logits: torch.Tensor, rows: list[Row]) -> list[int | None]:
    """Next token per row (logits (B, V)); a row whose sampling fails gets None and fails alone."""
    try:
        return pick_tokens(logits, [r.params for r in rows], [r.generator for r in rows]).tolist()
    except Exception:
        log.exception("sampling failed for the batch; retrying row by row")
    tokens: list[int | None] = []
    for i, row in enumerate(rows):
        try:
            tokens.append(int(pick_tokens(logits[i : i + 1], [row.params], [row.generator])[0]))
        except Exception as exc:
            row.handle._fail(FedPrefixError(f"sampling failed: {exc}"))
            tokens.append(None)
    return tokens


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, called for every row at every step.

    transformers' decode first walks the whole id list in Python (`to_py_obj`), which made
    each row's step O(its tokens) in Python; the Rust tokenizer underneath gives the same text
    when transformers adds nothing after it (no space clean-up, no decode of a subclass's own),
    so that one is called directly."""
    plain = (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._decode is TokenizersBackend._decode
        and type(tokenizer).decode is PreTrainedTokenizerBase.decode
        and not tokenizer.clean_up_tokenization_spaces
    )
    if not plain:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    backend = tokenizer.backend_tokenizer
    return lambda ids: backend.decode(ids, skip_special_tokens=True)


def take_token(row: Row, token: int, decode: Callable[[list[int]], str], eos: set[int], stats: EngineStats) -> None:
    """Give `row` its new token: it streams, finishes (EOS, stop string, length) or goes on."""
    params, handle = row.params, row.handle
    if token in eos and not params.ignore_eos:
        return finish(row, "stop", decode, stats)
    row.tokens.append(token)
    stats.tokens += 1
    text = decode(row.tokens)
    cut = stop_index(text, params.stop)
    if cut is not None:
        return finish(row, "stop", decode, stats, text[:cut])
    if len(row.tokens) >= params.max_new_tokens:
        return finish(row, "length", decode, stats, text)
    # Stream only text that cannot still turn into a stop string or an unfinished
    # multi-byte character, so streamed and non-streamed outputs are identical.
    safe = len(text) - holdback(text, params.stop)
    if safe > row.emitted:
        handle._emit(text[row.emitted : safe])
        row.emitted = safe


def finish(row: Row, reason: str, decode, stats: EngineStats, text: str | None = None) -> None:
    """End `row` with its result; the rest of its text is streamed first."""
    if text is None:
        text = decode(row.tokens)
    row.handle._emit(text[row.emitted :])
    row.emitted = len(text)
    stats.finished += 1
    row.handle._finish(
        GenerationResult(
            text=text, tokens=list(row.tokens), finish_reason=reason, prompt_tokens=len(row.handle.prompt_ids)
        )
    )


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold back: a possible stop-string start or a partial character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold
