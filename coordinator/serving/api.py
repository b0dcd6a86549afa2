"""The HTTP API's shapes: request bodies (pydantic), the key header, and errors in OpenAI's form.

Errors have OpenAI's shape, `{"error": {"message", "type", "code"}}`: missing key 401,
wrong key 403, unknown user 404, malformed body 422 (with the fields named), overload
429 (with Retry-After).
"""

from __future__ import annotations

import base64
import binascii

from fedprefix.common.chat import ChatMessage
from fedprefix.common.store import BadUserIdError, StoreError, UnknownUserError, WrongKeyError
from pydantic import BaseModel, ConfigDict, Field

KEY_HEADER = "X-Prefix-Key"


class SamplingBody(BaseModel):
    """Fields both endpoints share (the OpenAI ones this server honours; others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None  # whose prefix to use; None: the base alone


class CompletionBody(SamplingBody):
    """POST /v1/completions."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=4096)


class ApiChatMessage(ChatMessage):
    """A chat turn as OpenAI clients send it: fields other than role and content (name, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")


class ChatBody(SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ApiChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)


class ApiError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def parse_key(header: str | None) -> bytes | str | None:
    """The X-Prefix-Key header: base64 of exactly 32 bytes is a raw key, anything else a passphrase."""
    if header is None or header == "":
        return None
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
        return ApiError(403, str(exc), "wrong_key")
    if isinstance(exc, UnknownUserError):
        return ApiError(404, str(exc), "unknown_user")
    if isinstance(exc, BadUserIdError):
        return ApiError(422, str(exc), "bad_user_id")
    return ApiError(500, str(exc), getattr(exc, "reason", "store_error"))
