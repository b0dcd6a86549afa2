"""Local training data: validate rows, turn them into (prompt, completion) token ids.

Accepted forms (a list of rows, or a path to a .jsonl, .csv or .parquet file of rows, client/tables.py):
- ``{"prompt": str, "completion": str}``: the loss counts completion tokens only;
- ``{"messages": [{"role", "content"}, ...]}``: chat; the last assistant message is the
  completion, everything before it (through the chat template) the prompt;
- a plain string, or ``{"text": str}`` (how a table holds one): language modelling, every token counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedprefix.common.chat import ChatMessage, Text, chat_prompt, format_prompt, leading_bos, prompt_ids, unicode_text
from fedprefix.common.errors import DataError, first_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .tables import is_row_file, read_records

log = logging.getLogger(__name__)


class PromptCompletion(BaseModel):
    """One supervised example."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text
    completion: Text  # not empty (below): a min_length would test the length before the text is Unicode

    @field_validator("completion")
    @classmethod
    def _not_empty(cls, completion: str) -> str:
        if not completion:
            raise ValueError("the completion is empty: nothing to learn")
        return completion


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
    """Validate `local_data` (rows or a row file's path); errors name the row index (or line) and field."""
    if isinstance(local_data, os.PathLike) or (isinstance(local_data, str) and is_row_file(local_data)):
        return read_file_rows(local_data)
    if isinstance(local_data, str):
        raise DataError(
            "local_data is a single string; pass a list of rows or a path ending in .jsonl, .csv or .parquet"
        )
    if isinstance(local_data, Mapping):
        raise DataError(
            f"local_data is a single row (a dict with keys {sorted(local_data)}); pass a list of rows: [row]"
        )
    if not isinstance(local_data, Sequence) or isinstance(local_data, (bytes, bytearray)):
        raise DataError(
            "local_data must be a list of rows or a path to a .jsonl, .csv or .parquet file, "
            f"not {type(local_data).__name__}"
        )
    rows = [validate_row(raw, f"row {i}") for i, raw in enumerate(local_data)]
    if not rows:
        raise DataError("local_data is empty: give at least one row")
    return rows


def read_file_rows(path: str | os.PathLike) -> list[Row]:
    """The validated rows of a .jsonl, .csv or .parquet file; an empty file is refused."""
    rows = [validate_row(raw, where) for where, raw in read_records(path)]
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def validate_row(raw, where: str) -> Row:
    """One row in any accepted form, validated; `where` ("PATH line 3") starts the error message."""
    if isinstance(raw, (PromptCompletion, ChatRow)):  # already validated
        return raw
    if isinstance(raw, dict) and set(raw) == {"text"}:
        raw = raw["text"]
        if not isinstance(raw, str):
            raise DataError(f"{where}: field 'text': expected a string, got {type(raw).__name__}")
    if isinstance(raw, str):
        if not raw.strip():
            raise DataError(f"{where}: empty text")
        try:
            return unicode_text(raw)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
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
    # A blank completion, as blank text, is refused: it would teach blank replies.
    if isinstance(row, ChatRow) and not row.messages[-1].content.strip():
        raise DataError(f"{where}: field 'messages': the assistant's reply (the completion) is empty or blank")
    if isinstance(row, PromptCompletion) and not row.completion.strip():
        raise DataError(f"{where}: field 'completion': empty or blank (only whitespace)")
    return row


# No token of a real vocabulary is longer than this many characters: a text cut to max_length times
# as many keeps every token that tokenizing it whole would keep (only the cut end's token differs).
CHARS_PER_TOKEN = 64


def tokenize_rows(rows: Sequence[Row], tokenizer, max_length: int, use_chat_template: bool) -> list[Example]:
    """Token ids per row; over-long rows lose tokens from the left of the prompt (one warning).

    With `use_chat_template`, prompt/completion rows are framed as one user turn and the
    assistant's reply, as an instruct model expects; chat rows always are.
    """
    examples, cut_prompts, cut_completions = [], 0, 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = leading_bos(tokenizer)  # before plain text; a chat template writes its own
    chars = max_length * CHARS_PER_TOKEN  # a 50 MB row is cut before it is tokenized, not after
    for row in rows:
        prompt_text, completion_text = split_row(row, tokenizer, use_chat_template)
        prompt_text, completion_text = prompt_text[-chars:], completion_text[:chars]
        prompt = prompt_ids(tokenizer, prompt_text, None if templated(row, use_chat_template) else bos)
        completion = tokenizer(completion_text, add_special_tokens=False).input_ids + eos
        overflow = len(prompt) + len(completion) - max_length
        if overflow > 0:
            if overflow >= len(prompt):  # even an empty prompt is too long: keep the completion's start
                cut_completions += 1
                prompt, completion = [], completion[: max_length - 1]
            else:
                cut_prompts += 1
                prompt = prompt[overflow:]
        if not prompt:  # the first token needs context to be predicted from
            prompt, completion = completion[:1], completion[1:]
        if completion:
            examples.append(Example(prompt=prompt, completion=completion))
    if cut_prompts or cut_completions:
        log.warning(
            "%d of %d rows were longer than %d tokens: %d lost prompt tokens on the left, "
            "%d (a completion alone too long) their whole prompt and completion tokens on the right",
            cut_prompts + cut_completions,
            len(rows),
            max_length,
            cut_prompts,
            cut_completions,
        )
    if not examples:
        raise DataError("no row has any completion token left after tokenization")
    return examples


def templated(row: Row, use_chat_template: bool) -> bool:
    """Whether split_row puts the row's prompt through the chat template (chat rows always are)."""
    return isinstance(row, ChatRow) or (isinstance(row, PromptCompletion) and use_chat_template)


def split_row(row: Row, tokenizer, use_chat_template: bool) -> tuple[str, str]:
    """(prompt text, completion text) for any row form."""
    if isinstance(row, str):
        return "", row
    if isinstance(row, PromptCompletion):
        return (format_prompt(tokenizer, row.prompt) if use_chat_template else row.prompt), row.completion
    return chat_prompt(tokenizer, row.messages[:-1]), row.messages[-1].content
