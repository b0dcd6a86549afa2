"""Local training data: validate rows, turn them into (prompt, completion) token ids.

Accepted forms (a list of rows, or a path to a .jsonl, .json, .csv or .parquet file of rows, client/tables.py):
- ``{"prompt": str, "completion": str}``: the loss counts completion tokens only;
- ``{"messages": [{"role", "content"}, ...]}``: chat ending with the assistant's reply; every
  assistant message is a completion (as OpenAI's fine-tuning and TRL's assistant-only loss
  train them), behind the conversation before it (through the chat template); one with
  ``"weight": 0`` is context only;
- a plain string, or ``{"text": str}`` (how a table holds one): language modelling, every token counts.

Keys beyond a row form's own (an ``id``, a ``source``) are left aside, as dataset columns are
by other trainers; layouts of other tools (ShareGPT, Alpaca) get an error naming the mapping.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedprefix.common.chat import (
    ChatMessage,
    Text,
    chat_prompt,
    format_prompt,
    framed,
    leading_bos,
    prompt_ids,
    unicode_text,
)
from fedprefix.common.errors import DataError, first_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .tables import FORMAT_NAMES, check_format, is_row_file, read_records

log = logging.getLogger(__name__)


class PromptCompletion(BaseModel):
    """One supervised example."""

    # a user's text never goes into a validation error's text: a traceback printed to a run's
    # log (a node's, through Ray) showed a wrong-typed field's whole value
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    prompt: Text
    completion: Text  # not empty (below): a min_length would test the length before the text is Unicode

    @field_validator("completion")
    @classmethod
    def _not_empty(cls, completion: str) -> str:
        if not completion:
            raise ValueError("the completion is empty: nothing to learn")
        return completion


class TrainingMessage(ChatMessage):
    """A turn of a training conversation: an assistant's may be left out of the loss (OpenAI's
    fine-tuning format: ``"weight": 0``), as context for the turns after it."""

    weight: Literal[0, 1] = 1

    @model_validator(mode="after")
    def _weight_on_replies_only(self) -> TrainingMessage:
        if self.weight != 1 and self.role != "assistant":
            raise ValueError("only an assistant message takes a weight (0: context, not trained on)")
        return self


class ChatRow(BaseModel):
    """A conversation ending with the assistant's reply; each assistant message is a completion."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    messages: list[TrainingMessage] = Field(min_length=2)


Row = PromptCompletion | ChatRow | str


@dataclass
class Example:
    """One tokenized example: the loss is taken on `completion` only."""

    prompt: list[int]
    completion: list[int]  # ends with EOS where the tokenizer has one
    row: int  # the row it came from (a chat row gives one example per reply): splits keep rows whole


def read_rows(local_data: Sequence | str | os.PathLike) -> list[Row]:
    """Validate `local_data` (rows or a row file's path); errors name the row index (or line) and field."""
    if isinstance(local_data, os.PathLike) or (isinstance(local_data, str) and is_row_file(local_data)):
        return read_file_rows(local_data)
    if isinstance(local_data, str):
        if looks_like_path(local_data):
            check_format(local_data)  # names the extensions read
        raise DataError(f"local_data is a single string; pass a list of rows or a path ending in {FORMAT_NAMES}")
    if isinstance(local_data, Mapping):
        raise DataError(_mapping_problem(local_data))
    local_data = _frame_records(local_data)
    if hasattr(local_data, "read") or isinstance(local_data, (set, frozenset, bytes, bytearray)):
        kind = "bytes" if isinstance(local_data, (bytes, bytearray)) else "a set (rows keep their order)"
        if hasattr(local_data, "read"):
            kind = "an open file: pass its path"
        raise DataError(f"local_data is {kind}; give a list of rows or a path to a {FORMAT_NAMES} file")
    if not isinstance(local_data, Iterable):
        raise DataError(
            f"local_data must be a list of rows or a path to a {FORMAT_NAMES} file, not {type(local_data).__name__}"
        )
    ignored: set[str] = set()
    rows = [validate_row(raw, f"row {i}", ignored) for i, raw in enumerate(local_data)]  # a generator, a Dataset
    if not rows:
        raise DataError("local_data is empty: give at least one row")
    report_ignored(ignored)
    return rows


def _mapping_problem(data: Mapping) -> str:
    """What a dict given as local_data is (a row, a split dict, columns), and what to pass."""
    keys = sorted(map(str, data))
    values = list(data.values())
    if values and all(hasattr(v, "column_names") or hasattr(v, "columns") for v in values):
        return f"local_data is a dict of splits ({', '.join(keys)}), a DatasetDict: pass one, e.g. data[{keys[0]!r}]"
    lists = [v for v in values if isinstance(v, (list, tuple))]
    if values and len(lists) == len(values) and not any(isinstance(v, Mapping) for c in lists for v in c):
        return (
            f"local_data is a dict of columns ({', '.join(keys)}); pass its rows: "
            "[dict(zip(data, row)) for row in zip(*data.values())], or a DataFrame / datasets.Dataset of it"
        )
    return f"local_data is a single row (a dict with keys {keys}); pass a list of rows: [row]"


def _frame_records(data):
    """A data frame's rows as records (iterating one gives its column names); others unchanged.
    pandas writes a missing cell as NaN: left out, as parquet's null cells are."""
    if not hasattr(data, "columns"):
        return data
    if hasattr(data, "to_dicts"):  # polars
        return data.to_dicts()
    if hasattr(data, "to_dict"):  # pandas
        return [
            {k: v for k, v in record.items() if not (isinstance(v, float) and v != v)}
            for record in data.to_dict("records")
        ]
    return data


def looks_like_path(text: str) -> bool:
    """A string meant as a file's path (an existing file, or a name with a file extension), not a row's text."""
    if os.path.exists(text):
        return True
    return (
        not any(c.isspace() for c in text)
        and re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,9}", Path(text).suffix) is not None
    )


def report_ignored(ignored: set[str]) -> None:
    """One warning naming the keys rows held beside their row form's own."""
    if ignored:
        log.warning("rows hold keys that are not training data, left aside: %s", ", ".join(sorted(ignored)))


def read_file_rows(path: str | os.PathLike) -> list[Row]:
    """The validated rows of a .jsonl, .json, .csv or .parquet file; an empty file is refused."""
    ignored: set[str] = set()
    rows = [validate_row(raw, where, ignored) for where, raw in read_records(path)]
    if not rows:
        raise DataError(f"{path} has no rows")
    report_ignored(ignored)
    return rows


# other tools' row layouts (keys that tell them) -> how to write them here
OTHER_LAYOUTS = {
    "conversations": "ShareGPT's conversations of from/value: write messages of role/content (human -> user, "
    "gpt -> assistant, system -> system)",
    "instruction": "Alpaca's instruction/input/output: write prompt = instruction (and input after it), "
    "completion = output",
    "chosen": "a preference pair (chosen/rejected): prompt tuning learns from one completion; write prompt and "
    "the chosen completion",
}
FORM_KEYS = {"messages": ("messages",), "prompt": ("prompt", "completion"), "text": ("text",)}


def validate_row(raw, where: str, ignored: set[str] | None = None, allow_user: bool = False) -> Row:
    """One row in any accepted form, validated; `where` ("PATH line 3") starts the error message.
    Keys beyond the row form's own are left out and added to `ignored`."""
    if isinstance(raw, (PromptCompletion, ChatRow)):  # already validated
        return raw
    if isinstance(raw, Mapping):
        raw = _row_form_keys(dict(raw), where, ignored if ignored is not None else set(), allow_user)
        if set(raw) == {"text"}:
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
    if model is ChatRow and (tools := _tool_use(raw["messages"])):
        raise DataError(f"{where}: field 'messages': {tools} are not supported; messages are text turns")
    try:
        row = model.model_validate(raw)
    except ValidationError as exc:
        field, message = first_error(exc, "row")
        raise DataError(f"{where}: field '{field}': {message}") from exc
    if isinstance(row, ChatRow):
        if row.messages[-1].role != "assistant":
            raise DataError(f"{where}: field 'messages': the last message must be the assistant's reply")
        trained = trained_replies(row.messages)
        if not trained:
            raise DataError(f"{where}: field 'messages': no assistant reply to learn (each has weight 0)")
        # A blank completion, as blank text, is refused: it would teach blank replies.
        if blank := [i for i in trained if not row.messages[i].content.strip()]:
            raise DataError(f"{where}: field 'messages.{blank[0]}': an assistant reply (a completion) is blank")
    if isinstance(row, PromptCompletion) and not row.completion.strip():
        raise DataError(f"{where}: field 'completion': empty or blank (only whitespace)")
    return row


def _tool_use(messages) -> str | None:
    """What in `messages` is tool use (OpenAI's tool_calls, a tool's result), None if nothing is."""
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, Mapping):
            if "tool_calls" in message or "function_call" in message:
                return "tool calls (tool_calls)"
            if message.get("role") in ("tool", "function"):
                return f"tool results (role {message['role']!r})"
    return None


# No token of a real vocabulary is longer than this many characters: a text cut to max_length times
# as many keeps every token that tokenizing it whole would keep (only the cut end's token differs).
CHARS_PER_TOKEN = 64


def _row_form_keys(raw: dict, where: str, ignored: set[str], allow_user: bool = False) -> dict:
    """`raw` with only its row form's keys (messages; prompt and completion; or text). A `user`
    key is refused unless `allow_user` (a federation file's rows, their user column taken off)."""
    forms = [form for form, keys in FORM_KEYS.items() if any(key in raw for key in keys)]
    if len(forms) > 1:
        found = [key for form in forms for key in FORM_KEYS[form] if key in raw]
        raise DataError(f"{where}: the row has keys of two row forms ({', '.join(found)}): keep one")
    if not forms:
        hint = next((layout for key, layout in OTHER_LAYOUTS.items() if key in raw), None)
        keys = ", ".join(repr(key) for key in list(raw)[:8])
        raise DataError(
            f"{where}: a row needs prompt and completion, messages, or text; it has {keys or 'no keys'}"
            + (f". It looks like {hint}" if hint else "")
        )
    if "user" in raw and not allow_user:
        raise DataError(
            f"{where}: a 'user' column: rows of several users? Give fit one user's rows (federation data "
            "with a user column is split by user: fedprefix simulate --data), or drop the column"
        )
    kept = {key: raw[key] for key in FORM_KEYS[forms[0]] if key in raw}
    ignored.update(key for key in raw if key not in kept)
    return kept


def tokenize_rows(rows: Sequence[Row], tokenizer, max_length: int, use_chat_template: bool) -> list[Example]:
    """Token ids per completion (one per row; one per trained assistant message of a chat row).

    An over-long example keeps its completion's start and at least half of `max_length` for the
    prompt's end: prompts lose tokens on the left, completions on the right (one warning).
    With `use_chat_template`, prompt/completion rows are framed as one user turn and the
    assistant's reply, as an instruct model expects; chat rows always are.
    """
    examples, cut_total, cut_history, cut_prompts, cut_completions = [], 0, 0, 0, 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = leading_bos(tokenizer)  # before plain text; a chat template writes its own
    chars = max_length * CHARS_PER_TOKEN  # a 50 MB row is cut before it is tokenized, not after
    pieces = [  # (row, prompt text, completion text, the chat before it, whether the prompt is templated)
        (index, prompt_text[-chars:], completion_text[:chars], history, templated(row, use_chat_template))
        for index, row in enumerate(rows)
        for prompt_text, completion_text, history in completions(row, tokenizer, use_chat_template)
    ]
    # all texts tokenized in batches: one call per text took most of the time of 100,000 rows
    prompts = token_ids(tokenizer, [piece[1] for piece in pieces])
    replies = token_ids(tokenizer, [piece[2] for piece in pieces])
    for (index, _, _, history, is_templated), prompt, completion in zip(pieces, prompts, replies, strict=True):
        prompt = framed(prompt, None if is_templated else bos)
        completion = completion + eos
        if len(prompt) + len(completion) > max_length:
            cut_total += 1
            # the prompt's end keeps at least half the room (all it needs, if less): a long
            # reply trained with no question before it would teach replies out of nowhere
            room = max(max_length - len(completion), max_length // 2)
            # a long chat first loses its oldest exchanges, whole: its system message stays
            if len(prompt) > room and history:
                shorter = drop_oldest_exchanges(
                    history, lambda kept: prompt_ids(tokenizer, chat_prompt(tokenizer, kept)[-chars:], None), room
                )
                if shorter is not None:
                    prompt, cut_history = shorter, cut_history + 1
            kept = min(len(prompt), room)
            cut_prompts += kept < len(prompt)
            cut_completions += len(completion) > max_length - kept
            prompt, completion = prompt[len(prompt) - kept :], completion[: max_length - kept]
        if not prompt:  # the first token needs context to be predicted from
            prompt, completion = completion[:1], completion[1:]
        if completion:
            examples.append(Example(prompt=prompt, completion=completion, row=index))
    if cut_total:
        log.warning(
            "%d of %d completions were longer than %d tokens with their prompts: %d chat prompts lost "
            "their oldest exchanges, %d prompts lost tokens on the left, %d lost completion tokens on the right",
            cut_total,
            len(pieces),
            max_length,
            cut_history,
            cut_prompts,
            cut_completions,
        )
    if not examples:
        raise DataError("no row has any completion token left after tokenization")
    return examples


TOKENIZER_BATCH = 1024  # texts per tokenizer call


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids, without special tokens, as `tokenizer(text, add_special_tokens=False)`
    gives them one by one (an empty text: none), in batches."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZER_BATCH):
        batch = texts[start : start + TOKENIZER_BATCH]
        if any(batch):
            encoded = tokenizer(list(batch), add_special_tokens=False).input_ids
            ids += [list(row) if text else [] for text, row in zip(batch, encoded, strict=True)]
        else:
            ids += [[] for _ in batch]
    return ids


def templated(row: Row, use_chat_template: bool) -> bool:
    """Whether completions() puts the row's prompt through the chat template (chat rows always are)."""
    return isinstance(row, ChatRow) or (isinstance(row, PromptCompletion) and use_chat_template)


def completions(row: Row, tokenizer, use_chat_template: bool) -> list[tuple[str, str, list | None]]:
    """(prompt text, completion text, the messages before it or None) for each completion of a
    row: one, or one per assistant message of a chat with weight 1 (its prompt, the conversation
    before it)."""
    if isinstance(row, str):
        return [("", row, None)]
    if isinstance(row, PromptCompletion):
        return [((format_prompt(tokenizer, row.prompt) if use_chat_template else row.prompt), row.completion, None)]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat rows (messages) need a base with a chat template, and this one has none: give it "
            "prompt/completion rows"
        )
    turns = row.messages
    return [(chat_prompt(tokenizer, turns[:i]), turns[i].content, turns[:i]) for i in trained_replies(turns)]


def trained_replies(messages: Sequence[TrainingMessage]) -> list[int]:
    """Indexes of a chat's completions: its assistant messages of weight 1 after the first message
    (an opening assistant message has nothing before it to answer: context)."""
    return [i for i, m in enumerate(messages) if i > 0 and m.role == "assistant" and m.weight == 1]


def drop_oldest_exchanges(history: list, prompt_of: Callable[[list], list[int]], room: int) -> list[int] | None:
    """The prompt of `history` less its fewest oldest exchanges that leaves it within `room`
    tokens, or less all but its last user turn; None where it has no exchange to drop. An
    exchange runs from the first message after the system ones up to the next user message;
    system messages stay.

    Dropping more never lengthens a prompt, so the fewest is found by bisection: dropping them
    one at a time, each time templating and tokenizing the rest again, took cubic time in a
    chat's length (33 s for one chat row of 300 messages)."""
    head = next((i for i, m in enumerate(history) if m.role != "system"), len(history))
    starts = [i for i in range(head + 1, len(history)) if history[i].role == "user"]  # each exchange's end
    prompts: dict[int, list[int]] = {}

    def prompt(dropped: int) -> list[int]:  # `dropped` oldest exchanges left out, 1 or more
        if dropped not in prompts:
            prompts[dropped] = prompt_of(history[:head] + history[starts[dropped - 1] :])
        return prompts[dropped]

    if not starts:
        return None
    low, high = 1, len(starts)  # the fewest that fits, or all of them where none does
    while low < high:
        middle = (low + high) // 2
        if len(prompt(middle)) <= room:
            high = middle
        else:
            low = middle + 1
    return prompt(low)
