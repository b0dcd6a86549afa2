"""The HTTP API's shapes: request bodies (pydantic), the key header, and errors in OpenAI's form.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: missing key
401, wrong key 403, unknown user 404, body too large 413, malformed body, a request past a
cap or the context (code context_length_exceeded), or an OpenAI option this server does not
implement 400 (`param` and `fields` name the fields), overload or unlock throttling 429
(with Retry-After), the server's store failing on its disk 500 (the files and the OS's
reason only in the server's log).

The key header takes three forms (parse_key): base64 of exactly 32 bytes is a raw key;
`b64:` + base64 of a passphrase's UTF-8 bytes is that passphrase, any Unicode (what
clients that send ASCII-only headers, httpx and the openai client among them, must use
for non-ASCII passphrases); any other value is the passphrase itself (a raw non-ASCII
value is read as UTF-8).
"""

from __future__ import annotations

import base64
import binascii
import logging
import reprlib
from typing import Annotated, Any, Literal

from fedprefix.common.chat import ChatMessage, Text
from fedprefix.common.store import (
    BadUserIdError,
    StoreBusyError,
    StoreError,
    StoreIOError,
    UnknownUserError,
    WrongKeyError,
)
from fedprefix.common.store.errors import about
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, create_model, field_validator

log = logging.getLogger(__name__)

KEY_HEADER = "X-Prefix-Key"
PASSPHRASE_PREFIX = "b64:"  # X-Prefix-Key: b64:<base64 of the UTF-8 passphrase>
MAX_SEED = 2**63 - 1  # torch generators take 64 bits; OpenAI's seed is a signed 64-bit integer
MAX_FIELD_ERRORS = 8  # a 400 names at most this many faults (a 1 MiB body can hold a million)
MAX_MESSAGE_CHARS = 300  # of each fault: a reply never echoes a large value back
_SHORT = reprlib.Repr()  # (keyword settings need Python 3.12)
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 40, 40, 4, 4


def short(value: Any) -> str:
    """repr of a client's value, cut to a few dozen characters (for error messages)."""
    return _SHORT.repr(value)


def ListOf(item):  # noqa: N802 (a type)
    """list[item], validated up to its first bad item: a body of a million bad items costs one
    error, not a million (each also repeated per branch of a union)."""
    return Annotated[list[item], Field(fail_fast=True)]


# OpenAI's fields, and vLLM's extensions of them, that this server does not implement, and the
# values that ask for nothing: any other value is refused (400 naming the field), so a client
# never silently gets less than it asked for (one choice for n=3, plain text for JSON mode, no
# logprobs, free text for a guided choice, a reply past a stop token id).
_OFF = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v in (None, 0),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    # vLLM's
    "top_k": lambda v: v in (None, -1, 0),
    "min_p": lambda v: v in (None, 0),
    "min_tokens": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1),
    "ignore_eos": lambda v: v in (None, False),
    "stop_token_ids": lambda v: not v,
    "include_stop_str_in_output": lambda v: v in (None, False),
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
    "continue_final_message": lambda v: v in (None, False),
    "add_generation_prompt": lambda v: v in (None, True),
    "chat_template_kwargs": lambda v: not v,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False  # a last chunk with the usage and no choices


class _HonouredFields(BaseModel):
    """Fields both endpoints share: the OpenAI ones this server honours (unknown ones are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    # strict scalars, as OpenAI's: "3" or true is no number, "yes" no boolean
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    stop: Text | ListOf(Text) | None = None
    seed: StrictInt | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)  # OpenAI's: any signed 64-bit
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # whose prefix to use; None (or "", as OpenAI reads it): the base alone

    @property
    def include_usage(self) -> bool:
        """A stream's last chunk carries the usage (stream_options.include_usage)."""
        return self.stream_options is not None and self.stream_options.include_usage

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info) -> Any:
        """OpenAI's API takes null for these (the openai client sends it for an explicit None)."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("user")
    @classmethod
    def _empty_user_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator(*_OFF, check_fields=False)  # the fields are SamplingBody's
    @classmethod
    def _not_implemented(cls, value: Any, info) -> Any:
        if not _OFF[info.field_name](value):
            raise ValueError(f"{short(value)} is not supported by this server; leave {info.field_name} out")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info) -> StreamOptions | None:
        # where `stream` itself was refused, that is the fault to name
        if value is not None and "stream" in info.data and not info.data["stream"]:
            raise ValueError("only allowed with stream: true")
        return value


# ... and the fields of _OFF, each taking any value, which its check then refuses unless it asks
# for nothing (declared in _OFF's order, which decides the field an error names first)
SamplingBody = create_model(
    "SamplingBody", __base__=_HonouredFields, __doc__=_HonouredFields.__doc__, **{name: (Any, None) for name in _OFF}
)


class CompletionBody(SamplingBody):
    """POST /v1/completions: a prompt, several, or token ids (one list, or one per prompt)."""

    # strict ints: a lax union would read ["1", 2] or [true, false] as token ids
    prompt: Text | ListOf(Text) | ListOf(StrictInt) | ListOf(ListOf(StrictInt))
    # absent or null: OpenAI's default of 16, lowered to what the context leaves (not refused)
    max_tokens: StrictInt | None = Field(None, ge=1, le=4096)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]  # images and audio: refused, this base reads text only
    text: Text


class ApiChatMessage(BaseModel):
    """A chat turn as OpenAI clients send it: content as text or text parts; `developer` is
    the newer name of `system`; other fields (name, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | ListOf(TextPart)

    def turn(self) -> ChatMessage:
        content = self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=content)


class ChatBody(SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ApiChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: StrictInt | None = Field(None, ge=1, le=4096)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=4096)


class ApiError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, code: str, headers: dict | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.field = field  # the body field at fault, for a 400


def parse_key(header: str | None) -> bytes | str | None:
    """The X-Prefix-Key header -> a raw 32-byte key, a passphrase, or None (see the module docstring).

    ApiError 400 where a `b64:` value is not base64 of UTF-8 text, or a raw value is not UTF-8."""
    if header is None or header == "":
        return None
    if header.startswith(PASSPHRASE_PREFIX):
        try:
            passphrase = base64.b64decode(header[len(PASSPHRASE_PREFIX) :], validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ApiError(
                400, f"{KEY_HEADER}: after 'b64:' give the base64 of the passphrase's UTF-8 bytes", "bad_key_header"
            ) from None
        if not passphrase:
            raise ApiError(400, f"{KEY_HEADER}: the passphrase after 'b64:' is empty", "bad_key_header")
        return passphrase
    if not header.isascii():  # the server reads header bytes as latin-1; clients like curl send UTF-8
        try:
            return header.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise ApiError(
                400, f"{KEY_HEADER}: not UTF-8; send 'b64:' + base64 of the passphrase's UTF-8 bytes", "bad_key_header"
            ) from None
    try:
        raw = base64.b64decode(header, validate=True)
        if len(raw) == 32:
            return raw
    except (binascii.Error, ValueError):
        pass
    return header


def store_error(exc: StoreError) -> ApiError:
    """The HTTP answer to a store error."""
    if isinstance(exc, WrongKeyError):
        # not the store's detail: "protected by a passphrase" would tell a guesser what to guess
        return ApiError(403, about(exc.user_id, "wrong key"), "wrong_key")
    if isinstance(exc, UnknownUserError):
        return ApiError(404, str(exc), "unknown_user")
    if isinstance(exc, BadUserIdError):
        return ApiError(400, str(exc), "bad_user_id", field="user")
    if isinstance(exc, StoreBusyError):  # a writer holds the user, or has a write of theirs to complete
        return ApiError(503, str(exc), exc.reason, {"Retry-After": "1"})
    if isinstance(exc, StoreIOError):  # the server's disk failed, not the request: its paths stay in its log
        log.error("%s", exc)
        problem = "the server could not read its prefix store" if exc.user_id else "the server could not read it"
        return ApiError(500, about(exc.user_id, problem), exc.reason)
    return ApiError(500, str(exc), getattr(exc, "reason", "store_error"))


def _is_branch_tag(part) -> bool:
    """Whether a pydantic error location part names a branch of a union ("str", "list[int]",
    "function-after[unicode_text(), str]", "TextPart"), not a field: our fields are snake_case."""
    if not isinstance(part, str):
        return False  # a list index
    return not part.isidentifier() or part in {"str", "int", "float", "bool"} or part[:1].isupper()


def field_errors(errors: list[dict]) -> list[dict]:
    """Pydantic's errors of a body as what a client can act on: one entry per field, at most
    MAX_FIELD_ERRORS of them. Of a union (a prompt: text, texts, token ids or lists of them),
    only the branches that got furthest into the value speak: ["a", 1] is "prompt.1: should be
    a valid string", not also "prompt.0: should be a valid integer"; where none got past the
    value's type, their expectations are merged ("a valid string or a valid list")."""
    found: list[tuple[str, str]] = []
    branches: dict[str, list[tuple[tuple, str, str]]] = {}  # union path -> (progress, field, message)
    for error in errors:
        loc, message = tuple(error["loc"]), error["msg"].removeprefix("Value error, ")
        if error["type"] == "json_invalid":  # ("body", <character offset>)
            reason = (error.get("ctx") or {}).get("error", "")
            found.append(("body", f"not valid JSON at character {loc[-1]}: {reason}".rstrip(": ")))
            continue
        field = ".".join(str(part) for part in loc if not _is_branch_tag(part))
        tag = next((i for i, part in enumerate(loc) if _is_branch_tag(part)), None)
        if tag is None:
            found.append((field, message))
            continue
        inside = loc[tag + 1 :]  # how far into the value this branch got before it failed
        first = inside[0] if inside and isinstance(inside[0], int) else -1
        progress = (len(inside) > 0, first, len(inside), not error["type"].endswith("_type"))
        branches.setdefault(".".join(map(str, loc[:tag])), []).append((progress, field, message))
    for candidates in branches.values():
        furthest = max(progress for progress, _, _ in candidates)
        found += [(field, message) for progress, field, message in candidates if progress == furthest]
    merged: dict[str, list[str]] = {}
    for field, message in found:
        if message not in merged.setdefault(field, []):
            merged[field].append(message)
    fields = [
        {"field": field, "message": " or ".join([ms[0]] + [m.removeprefix("Input should be ") for m in ms[1:]])}
        for field, ms in merged.items()
    ]
    for entry in fields:
        if len(entry["message"]) > MAX_MESSAGE_CHARS:
            entry["message"] = entry["message"][: MAX_MESSAGE_CHARS - 3] + "..."
    if len(fields) > MAX_FIELD_ERRORS:
        more = len(fields) - MAX_FIELD_ERRORS
        fields = fields[:MAX_FIELD_ERRORS] + [{"field": "body", "message": f"and {more} more faults"}]
    return fields
