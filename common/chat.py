"""Chat messages and how they become a prompt: one definition for training rows and the HTTP API.

Training (`client/data.py`) and serving (`coordinator/serving/server.py`) must put a
conversation through the same chat template, or a prefix trained on one format is
served behind another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError

from .errors import ConfigError, first_error


def unicode_text(text: str) -> str:
    """`text`, if it is valid Unicode; ValueError naming the place of a lone surrogate.

    JSON can carry one ("\\ud800"), and so can Python strings, but no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(unicode_text)]  # a str field that a tokenizer can read


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # no user text in error texts
    role: Literal["system", "user", "assistant"]
    content: Text


def chat_prompt(tokenizer, messages: Sequence[ChatMessage | dict]) -> str:
    """`messages` through the tokenizer's chat template, ending where the assistant's reply begins."""
    turns = [m.model_dump(include={"role", "content"}) if isinstance(m, BaseModel) else m for m in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text it encodes with its special tokens, or None.

    Read from what its post-processor does, not from `add_bos_token`, which transformers 5
    reports False also for tokenizers that add one (Llama 2 style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    marked, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    return bos if marked[:1] == [bos] and marked[1 : 1 + len(plain)] == plain else None


def prompt_ids(tokenizer, text: str, bos: int | None) -> list[int]:
    """A prompt's token ids: one rule for training rows, Personalizer.generate and serving.

    Text a chat template wrote holds the special tokens the template puts in (a BOS where the
    model wants one): it is tokenized as it is (`bos` None). Plain text gets the tokenizer's
    BOS in front (`bos`: leading_bos(tokenizer)), as transformers, PEFT and vLLM's completions
    give it, and nothing else (no EOS after a prompt)."""
    return framed(tokenizer(text, add_special_tokens=False).input_ids if text else [], bos)


def framed(ids: list[int], bos: int | None) -> list[int]:
    """A prompt's token ids framed as prompt_ids frames them: `bos` in front of plain text's,
    nothing (None) before templated text's."""
    return ids if bos is None else [bos, *ids]


def format_prompt(tokenizer, text: str) -> str:
    """`text` as a single user turn in the tokenizer's chat template, ready for the reply."""
    return chat_prompt(tokenizer, [{"role": "user", "content": text}])


def _is_chat(value: object) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (dict, ChatMessage))


_CHAT = TypeAdapter(list[ChatMessage])


def _checked_prompt(index: int, item: object) -> str | list[dict]:
    if isinstance(item, str):
        try:
            return unicode_text(item)
        except ValueError as exc:
            raise ConfigError(f"prompt {index}: {exc}") from None
    if _is_chat(item):
        try:
            return [m.model_dump() for m in _CHAT.validate_python(list(item))]
        except ValidationError as exc:
            field, message = first_error(exc, "message")
            raise ConfigError(f"prompt {index}: message {field}: {message}") from None
    kind = type(item).__name__
    raise ConfigError(f"prompt {index}: expected a string or a chat (a list of role/content dicts), got {kind}")


def generation_prompts(prompt: object) -> tuple[list[str | list[dict]], bool]:
    """Personalizer.generate's `prompt`: a string, a chat (a list of {"role", "content"} dicts, as
    OpenAI's messages), or a list of strings and chats. Returns (the prompts, each checked;
    whether `prompt` was a single one). ConfigError naming the one that is wrong."""
    single = isinstance(prompt, str) or _is_chat(prompt)
    if not single and not isinstance(prompt, (list, tuple)):  # a dict or bytes would iterate as something else
        raise ConfigError(f"prompt must be a string, a chat or a list of them, got {type(prompt).__name__}")
    items = [prompt] if single else list(prompt)
    if not items:
        raise ConfigError("generate needs at least one prompt")
    return [_checked_prompt(i, item) for i, item in enumerate(items)], single


def generation_ids(tokenizer, prompt: str | list[dict], use_chat_template: bool) -> list[int]:
    """A checked generate() prompt's token ids, framed as training frames its rows: a chat through
    the chat template; a string too where `use_chat_template`, as one user turn; else plain text."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("a chat prompt needs a base with a chat template; this one has none (give plain text)")
        return prompt_ids(tokenizer, chat_prompt(tokenizer, prompt), None)
    if use_chat_template:
        return prompt_ids(tokenizer, format_prompt(tokenizer, prompt), None)
    return prompt_ids(tokenizer, prompt, leading_bos(tokenizer))
