"""Local training data: validate rows, turn them into (prompt, completion) token ids.

Accepted forms (a list of rows, or a path to a .jsonl file of rows):
- ``{"prompt": str, "completion": str}``: the loss counts completion tokens only;
- ``{"messages": [{"role", "content"}, ...]}``: chat; the last assistant message is the
  completion, everything before it (through the chat template) the prompt;
- a plain string: language modelling, every token counts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedprefix.common.chat import ChatMessage, chat_prompt, format_prompt
from fedprefix.common.errors import DataError, first_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)


class PromptCompletion(BaseModel):
    """One supervised example."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    completion: str = Field(min_length=1)


class ChatRow(BaseModel):
    """A conversation whose last message, from the assistant, is the completion."""

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(min_length=2)


Row = PromptCompletion | ChatRow | str


@dataclass
class Example:
    """One tokenized example: the loss is taken on `completion` only."""

    prompt: list[int]
    completion: list[int]  # ends with EOS where the tokenizer has one


def read_rows(local_data: Sequence | str | os.PathLike) -> list[Row]:
    """Validate `local_data` (rows or a .jsonl path); errors name the row index (or line) and field."""
    if isinstance(local_data, os.PathLike) or (isinstance(local_data, str) and local_data.endswith(".jsonl")):
        return _read_jsonl(Path(local_data))
    if isinstance(local_data, str):
        raise DataError("local_data is a single string; pass a list of rows or a path ending in .jsonl")
    if isinstance(local_data, Mapping):
        raise DataError(
            f"local_data is a single row (a dict with keys {sorted(local_data)}); pass a list of rows: [row]"
        )
    if not isinstance(local_data, Sequence) or isinstance(local_data, (bytes, bytearray)):
        raise DataError(f"local_data must be a list of rows or a .jsonl path, not {type(local_data).__name__}")
    rows = [_validate(raw, f"row {i}") for i, raw in enumerate(local_data)]
    if not rows:
        raise DataError("local_data is empty: give at least one row")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start} is invalid)") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        rows.append(_validate(raw, f"{path} line {number}"))
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def _validate(raw, where: str) -> Row:
    if isinstance(raw, (PromptCompletion, ChatRow)):  # already validated
        return raw
    if isinstance(raw, str):
        if not raw.strip():
            raise DataError(f"{where}: empty text")
        return raw
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object or a string, got {type(raw).__name__}")
    model = ChatRow if "messages" in raw else PromptCompletion
    try:
        row = model.model_validate(raw)
    except ValidationError as exc:
        field, message = first_error(exc, "row")
        raise DataError(f"{where}: field '{field}': {message}") from exc
    if isinstance(row, ChatRow) and row.messages[-1].role != "assistant":
        raise DataError(f"{where}: field 'messages': the last message must be the assistant's reply")
    return row


def tokenize_rows(rows: Sequence[Row], tokenizer, max_length: int, use_chat_template: bool) -> list[Example]:
    """Token ids per row; over-long rows lose tokens from the left of the prompt (one warning).

    With `use_chat_template`, prompt/completion rows are framed as one user turn and the
    assistant's reply, as an instruct model expects; chat rows always are.
    """
    examples, truncated = [], 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        prompt_text, completion_text = split_row(row, tokenizer, use_chat_template)
        prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids if prompt_text else []
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            prompt = [tokenizer.bos_token_id, *prompt]
        completion = tokenizer(completion_text, add_special_tokens=False).input_ids + eos
        overflow = len(prompt) + len(completion) - max_length
        if overflow > 0:
            truncated += 1
            if overflow >= len(prompt):  # even an empty prompt is too long: keep the completion's start
                prompt, completion = [], completion[: max_length - 1]
            else:
                prompt = prompt[overflow:]
        if not prompt:  # the first token needs context to be predicted from
            prompt, completion = completion[:1], completion[1:]
        if completion:
            examples.append(Example(prompt=prompt, completion=completion))
    if truncated:
        log.warning(
            "%d of %d rows were longer than %d tokens and lost prompt tokens on the left",
            truncated,
            len(rows),
            max_length,
        )
    if not examples:
        raise DataError("no row has any completion token left after tokenization")
    return examples


def split_row(row: Row, tokenizer, use_chat_template: bool) -> tuple[str, str]:
    """(prompt text, completion text) for any row form."""
    if isinstance(row, str):
        return "", row
    if isinstance(row, PromptCompletion):
        return (format_prompt(tokenizer, row.prompt) if use_chat_template else row.prompt), row.completion
    return chat_prompt(tokenizer, row.messages[:-1]), row.messages[-1].content
