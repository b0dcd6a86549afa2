"""One row of the running batch, and what happens to it at each step: its next token
picked, its text settled and streamed, or its end (EOS, a stop string, max tokens).

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


class SettledText:
    """A row's text as its tokens arrive, in the part later tokens cannot change (`settled`).

    Decoding every token again at each step is not enough: a byte-fallback tokenizer (Llama 2,
    Mistral, Gemma) decodes a run of byte tokens that is not yet valid UTF-8 as one U+FFFD per
    byte, which rewrites text already decoded ('a中' -> 'a����' -> 'a中😀'), and the stream could
    not take back what it sent. As in vLLM's detokenizer, only the tokens after the last settled
    point are decoded again, behind the tokens settled before them (context: whether a
    SentencePiece word starts with a space depends on what precedes it), and their text settles
    once it does not end in U+FFFD. A row's result is its settled text, so a stream of the
    settled text equals it."""

    def __init__(self) -> None:
        self.settled = ""
        self._context = 0  # tokens[_context:_done] are decoded again as context
        self._done = 0  # tokens whose text is in `settled`
        self._context_chars = 0  # len(decode(tokens[_context:_done]))

    def update(self, tokens: list[int], decode: Callable[[list[int]], str]) -> None:
        """Settle what the tokens added since the last call allow (their text, unless unfinished)."""
        window = decode(tokens[self._context :])
        if len(window) > self._context_chars and not window.endswith("\ufffd"):
            self.settled += window[self._context_chars :]
            self._context, self._done = self._done, len(tokens)
            self._context_chars = len(decode(tokens[self._context : self._done]))

    def final(self, tokens: list[int], decode: Callable[[list[int]], str]) -> str:
        """The text at the row's end: the settled text, then the unsettled tail as it decodes
        now (an unfinished character as U+FFFD, as tokenizer.decode gives it)."""
        window = decode(tokens[self._context :])
        return self.settled + window[self._context_chars :]


@dataclass
class Row:
    """A request inside the running batch."""

    handle: RequestHandle
    params: SamplingParams
    generator: torch.Generator | None
    position: int  # position id of the next token fed to the model
    tokens: list[int] = field(default_factory=list)
    text: SettledText = field(default_factory=SettledText)
    emitted: int = 0  # characters of text.settled already streamed


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
        return pick_tokens(
            logits, [r.params for r in rows], [r.generator for r in rows], [r.tokens for r in rows]
        ).tolist()
    except Exception:
        log.exception("sampling failed for the batch; retrying row by row")
    tokens: list[int | None] = []
    for i, row in enumerate(rows):
        try:
            tokens.append(int(pick_tokens(logits[i : i + 1], [row.params], [row.generator], [row.tokens])[0]))
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
    searched = len(row.text.settled)
    row.text.update(row.tokens, decode)
    text = row.text.settled
    cut = stop_index(text, params.stop, searched)
    if cut is not None:
        return finish(row, "stop", decode, stats, text[:cut])
    if len(row.tokens) >= params.max_new_tokens:
        return finish(row, "length", decode, stats)
    # Stream only settled text that cannot still turn into a stop string, so streamed and
    # non-streamed outputs are identical.
    safe = len(text) - holdback(text, params.stop)
    if safe > row.emitted:
        handle._emit(text[row.emitted : safe])
        row.emitted = safe


def finish(row: Row, reason: str, decode, stats: EngineStats, text: str | None = None) -> None:
    """End `row` with its result (`text`, or its final text, cut at a stop string in its
    unsettled tail); the rest of its text is streamed first."""
    if text is None:
        text = row.text.final(row.tokens, decode)
        cut = stop_index(text, row.params.stop, len(row.text.settled))
        text, reason = (text, reason) if cut is None else (text[:cut], "stop")
    row.handle._emit(text[row.emitted :])
    row.emitted = len(text)
    stats.finished += 1
    row.handle._finish(
        GenerationResult(
            text=text, tokens=list(row.tokens), finish_reason=reason, prompt_tokens=len(row.handle.prompt_ids)
        )
    )


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold back: the longest that could start a stop string."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold
