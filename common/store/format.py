"""The ``.fpx`` file: byte layout, header model, canonical JSON; strict parsing and reading.

One file per stored part, ``<root>/<store name>.fpx``. A user's personal part is stored
under the user id, the shared part under ``<user_id>@shared``. User ids: 1-128 of
``A-Z a-z 0-9 . _ - @``, not starting with ``.`` and not ending in ``@shared`` (any
case), so every id is its own safe file name and no id reaches another user's part.
Every name derived from a valid id (at most 135 characters) is valid; the id is checked
once, before anything is written. (Stores written before this rule: an id that ends in
``@shared`` is now read as the shared part of the id before it.)::

    offset   size  field
    0        4     magic, b"FPX1"
    4        4     H: header length, unsigned 32-bit big-endian, 1 .. 65536
    8        H     header: canonical JSON (sorted keys, no spaces, ASCII-only, UTF-8)
    8+H      C     payload: AES-256-GCM ciphertext, its 16-byte tag last;
                   C == header.payload_length and nothing may follow

Header fields (``FileHeader``)::

    format_version   2 (1: files written before `parts`; read, and rewritten as 2 by the next write)
    user_id          store name: the owner's id, or <id>@shared for the shared part
    parts            the parts the user had after this write, sorted: ["personal"], ["shared"] or
                     ["personal", "shared"]. Absent in format 1.
    write_id         16 hex digits, random per write of the user, the same in each of its files:
                     every write re-seals all of the user's parts, so a part deleted, put back
                     or left from another write is refused (rollback.check_parts). Absent in format 1.
    base_fingerprint base model the prefix belongs to
    prefix_config    PrefixConfig.model_dump()
    dtype            "float32" | "float16" | "bfloat16", dtype of the stored tensors
    counter          write counter, +1 on every write of this user (rollback detection)
    key_id           16 hex digits, random, names the data key (DEK); new on rotate_data_key
    kdf              {"name": "scrypt", "salt": b64, "n", "r", "p"} or {"name": "raw"}
    wrapped_dek      {"nonce": b64 (12 B), "ciphertext": b64 (32 B DEK + 16 B tag)}
    payload_nonce    b64 (12 B)
    payload_length   C
    header_mac       64 hex digits, HMAC-SHA256 of all the other fields (seal.py)

The header must be byte-for-byte the canonical encoding of its parsed values, so
authenticating the values authenticates every header byte (and the length field).
Parsing raises only StoreError subclasses, whatever the bytes; nothing here needs a key.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import secrets
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import files
from ..errors import first_error
from ..prefix import PrefixConfig
from .errors import (
    BadUserIdError,
    CorruptError,
    StoreIOError,
    TruncatedError,
    UnknownUserError,
    UnknownVersionError,
    WrongUserError,
    about,
)

__all__ = [
    "FILE_SUFFIX",
    "FORMAT_VERSION",
    "KEY_BYTES",
    "MAGIC",
    "PARTS",
    "READ_VERSIONS",
    "FileHeader",
    "RawKdf",
    "UserWrite",
    "ScryptKdf",
    "WrappedKey",
    "b64",
    "canonical_json",
    "check_owner",
    "encode_file",
    "new_key_id",
    "parse_file",
    "parse_header",
    "read_file",
    "read_header",
    "split_store_name",
    "store_name",
    "unb64",
    "validate_store_name",
    "validate_user_id",
]

MAGIC = b"FPX1"
FORMAT_VERSION = 2  # what every write writes
READ_VERSIONS = (1, 2)  # what a load reads
FILE_SUFFIX = ".fpx"
SHARED_SUFFIX = "@shared"  # store name of a user's shared part: <user_id>@shared
PARTS = ("personal", "shared")
PREFIX_LEN = 8  # magic + header length
MAX_HEADER_BYTES = 64 * 1024  # a real header is ~1 KB; the cap bounds what a bad file makes us parse
MAX_PAYLOAD_BYTES = 1 << 40
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit GCM nonce
TAG_BYTES = 16
SALT_BYTES = 16
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_MEMORY = 1 << 30  # 128*n*r*p bytes; caps what a forged header can make us allocate

_USER_ID_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")  # a key id or a write id: new_key_id's shape
_MAC_RE = re.compile(r"[0-9a-f]{64}")


def validate_user_id(user_id: object) -> str:
    """Return `user_id` if it is a valid user id (every name derived from it is then valid)."""
    if (
        not isinstance(user_id, str)
        or not _USER_ID_RE.fullmatch(user_id)
        or user_id.startswith(".")
        or user_id.lower().endswith(SHARED_SUFFIX)  # any case: case-insensitive filesystems
    ):
        shown = user_id if isinstance(user_id, str) and len(user_id) <= 140 else f"<{type(user_id).__name__}>"
        raise BadUserIdError(
            f"invalid user id {shown!r}: use 1-128 ASCII letters, digits or '._-@', not starting with '.' "
            f"and not ending in {SHARED_SUFFIX!r} (reserved for the store's shared parts)"
        )
    return user_id


def store_name(user_id: str, part: str = "personal") -> str:
    """The store name of `user_id`'s `part` ('personal': the id itself, 'shared': id + '@shared')."""
    validate_user_id(user_id)
    if part not in PARTS:
        raise BadUserIdError(f"user {user_id!r}: part must be one of {PARTS}, got {part!r}", user_id)
    return user_id if part == "personal" else user_id + SHARED_SUFFIX


def split_store_name(name: object) -> tuple[str, str]:
    """(user id, part) of a store name; BadUserIdError if it is neither a user id nor a part name."""
    if isinstance(name, str) and name.endswith(SHARED_SUFFIX):
        return validate_user_id(name[: -len(SHARED_SUFFIX)]), "shared"
    return validate_user_id(name), "personal"


def validate_store_name(name: object) -> str:
    """Return `name` if it is a user id or the name of a user's shared part."""
    split_store_name(name)
    return name  # type: ignore[return-value]


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding we write and accept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def b64(data: bytes) -> str:
    """Standard base64 text, the encoding of every binary header field."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Decode base64 we wrote; only for fields already validated by the header model."""
    return base64.b64decode(text, validate=True)


def _check_b64(text: str, min_len: int, max_len: int) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError("not base64") from exc
    if b64(raw) != text:  # one encoding per value, so the bytes are canonical
        raise ValueError("not canonical base64")
    if not min_len <= len(raw) <= max_len:
        raise ValueError(f"decodes to {len(raw)} bytes, expected {min_len}..{max_len}")
    return text


# ---------------------------------------------------------------------------- header model

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class ScryptKdf(BaseModel):
    """KEK from a passphrase via scrypt."""

    model_config = _STRICT
    name: Literal["scrypt"]
    salt: str
    n: int
    r: int
    p: int

    @field_validator("salt")
    @classmethod
    def _salt(cls, v: str) -> str:
        return _check_b64(v, SALT_BYTES, 64)

    @model_validator(mode="after")
    def _cost(self) -> ScryptKdf:
        n, r, p = self.n, self.r, self.p
        if n < 2 or n > MAX_SCRYPT_N or n & (n - 1):
            raise ValueError(f"scrypt n must be a power of two in 2..{MAX_SCRYPT_N}")
        if not (1 <= r <= 32 and 1 <= p <= 16) or 128 * n * r * p > MAX_SCRYPT_MEMORY:
            raise ValueError("scrypt r/p out of range")
        return self


class RawKdf(BaseModel):
    """KEK is 32 raw bytes the application supplies."""

    model_config = _STRICT
    name: Literal["raw"]


Kdf = Annotated[ScryptKdf | RawKdf, Field(discriminator="name")]


class WrappedKey(BaseModel):
    """The DEK encrypted under the KEK."""

    model_config = _STRICT
    nonce: str
    ciphertext: str

    @field_validator("nonce")
    @classmethod
    def _nonce(cls, v: str) -> str:
        return _check_b64(v, NONCE_BYTES, NONCE_BYTES)

    @field_validator("ciphertext")
    @classmethod
    def _ct(cls, v: str) -> str:
        return _check_b64(v, KEY_BYTES + TAG_BYTES, KEY_BYTES + TAG_BYTES)


class FileHeader(BaseModel):
    """The plaintext header of a ``.fpx`` file (see the module docstring)."""

    model_config = _STRICT
    format_version: Literal[1, 2]
    user_id: str
    parts: list[Literal["personal", "shared"]] | None = None  # None only in format 1
    write_id: str | None = None  # None only in format 1
    base_fingerprint: str = Field(max_length=256)
    prefix_config: PrefixConfig
    dtype: Literal["float32", "float16", "bfloat16"]
    counter: int = Field(ge=1, le=2**62)
    key_id: str
    kdf: Kdf
    wrapped_dek: WrappedKey
    payload_nonce: str
    payload_length: int = Field(ge=TAG_BYTES, le=MAX_PAYLOAD_BYTES)
    header_mac: str

    @model_validator(mode="after")
    def _parts(self) -> FileHeader:
        for field, value in (("parts", self.parts), ("write_id", self.write_id)):
            if (value is None) != (self.format_version == 1):
                verb = "has no" if self.format_version == 1 else "needs"
                raise ValueError(f"format {self.format_version} {verb} {field}")
        if self.write_id is not None and not _KEY_ID_RE.fullmatch(self.write_id):
            raise ValueError("write_id must be 16 lowercase hex digits")
        if self.parts is not None:
            own = split_store_name(self.user_id)[1]
            if self.parts != sorted(set(self.parts)) or own not in self.parts:
                raise ValueError(f"parts must list this part ({own}) and be sorted, without repeats")
        return self

    def fields(self) -> dict[str, Any]:
        """The header as JSON values, as written and authenticated (format 1 has no parts or write_id)."""
        return self.model_dump(mode="json", exclude={"parts", "write_id"} if self.format_version == 1 else None)

    @field_validator("header_mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        if not _MAC_RE.fullmatch(v):
            raise ValueError("header_mac must be 64 lowercase hex digits")
        return v

    @field_validator("user_id")
    @classmethod
    def _user(cls, v: str) -> str:
        return validate_store_name(v)

    @field_validator("key_id")
    @classmethod
    def _key_id(cls, v: str) -> str:
        if not _KEY_ID_RE.fullmatch(v):
            raise ValueError("key_id must be 16 lowercase hex digits")
        return v

    @field_validator("payload_nonce")
    @classmethod
    def _nonce(cls, v: str) -> str:
        return _check_b64(v, NONCE_BYTES, NONCE_BYTES)

    @model_validator(mode="after")
    def _same_base(self) -> FileHeader:
        if self.prefix_config.base_fingerprint != self.base_fingerprint:
            raise ValueError("base_fingerprint differs from prefix_config.base_fingerprint")
        return self


# ---------------------------------------------------------------------------- bytes <-> header


def check_owner(user_id: str, header: FileHeader) -> None:
    """WrongUserError unless the file at `user_id`'s name holds `user_id`'s prefix."""
    if header.user_id != user_id:
        raise WrongUserError(
            about(user_id, f"the file holds the prefix of user {header.user_id!r} (copied or renamed)"), user_id
        )


def new_key_id() -> str:
    """A fresh random id of 16 hex digits: a data key's id, or a write's."""
    return secrets.token_hex(8)


class UserWrite(NamedTuple):
    """What one write of a user puts in each of its files: the user's parts after it, and its id."""

    parts: list[str]
    write_id: str

    @classmethod
    def new(cls, parts: Iterable[str]) -> UserWrite:
        return cls(sorted(set(parts)), new_key_id())


def encode_file(header_fields: dict[str, Any], ciphertext: bytes) -> bytes:
    """The file's bytes: magic, header length, canonical header, payload."""
    raw = canonical_json(header_fields)
    return MAGIC + struct.pack(">I", len(raw)) + raw + ciphertext


def parse_header(data: bytes, user_id: str | None = None) -> tuple[FileHeader, int]:
    """Parse magic, length and header at the start of `data`; returns (header, payload offset).

    Raises only StoreError subclasses; `user_id` only names the user in messages.
    """
    if len(data) < len(MAGIC):
        if MAGIC.startswith(bytes(data)):
            raise TruncatedError(about(user_id, f"file is truncated ({len(data)} bytes)"), user_id)
        raise CorruptError(about(user_id, "not a fedprefix prefix file (bad magic bytes)"), user_id)
    if bytes(data[:4]) != MAGIC:
        raise CorruptError(about(user_id, "not a fedprefix prefix file (bad magic bytes)"), user_id)
    if len(data) < PREFIX_LEN:
        raise TruncatedError(about(user_id, f"file is truncated ({len(data)} bytes)"), user_id)
    (size,) = struct.unpack(">I", data[4:8])
    if not 1 <= size <= MAX_HEADER_BYTES:
        raise CorruptError(about(user_id, f"header length {size} is out of range"), user_id)
    end = PREFIX_LEN + size
    if len(data) < end:
        raise TruncatedError(about(user_id, f"file is truncated inside the header ({len(data)} bytes)"), user_id)
    raw = bytes(data[PREFIX_LEN:end])
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptError(about(user_id, "header is not valid JSON"), user_id) from exc
    if not isinstance(obj, dict):
        raise CorruptError(about(user_id, "header is not a JSON object"), user_id)
    version = obj.get("format_version")
    if type(version) is not int:  # bool is an int subclass; refuse it here
        raise CorruptError(about(user_id, "header has no format_version"), user_id)
    if version not in READ_VERSIONS:
        readable = " and ".join(map(str, READ_VERSIONS))
        raise UnknownVersionError(
            about(user_id, f"unknown file format version {version} (this code reads versions {readable})"), user_id
        )
    try:
        header = FileHeader.model_validate(obj)
    except ValidationError as exc:
        where, message = first_error(exc, "header")
        raise CorruptError(about(user_id, f"malformed header ({where}: {message})"), user_id) from None
    if canonical_json(header.fields()) != raw:
        # Only the canonical encoding is accepted, so the authenticated values fix every byte.
        raise CorruptError(about(user_id, "header is not in canonical form"), user_id)
    return header, end


def _check_payload_size(header: FileHeader, rest: int, user_id: str | None) -> None:
    """Refuse a file whose `rest` bytes after the header are not exactly the payload."""
    if rest < header.payload_length:
        raise TruncatedError(
            about(user_id, f"file is truncated ({rest} of {header.payload_length} payload bytes)"), user_id
        )
    if rest > header.payload_length:
        raise CorruptError(
            about(user_id, f"{rest - header.payload_length} unexpected bytes after the payload"), user_id
        )


def parse_file(data: bytes, user_id: str | None = None) -> tuple[FileHeader, bytes]:
    """Parse a whole ``.fpx`` file into (header, payload ciphertext with tag); StoreError only."""
    header, end = parse_header(data, user_id)
    _check_payload_size(header, len(data) - end, user_id)
    return header, bytes(data[end:])


# ---------------------------------------------------------------------------- reading from disk


def open_regular(path: Path, user_id: str):
    """`path` opened for reading, if it is a regular file (CorruptError otherwise: a FIFO put
    there would block every reader, a link to a device such as /dev/zero never end);
    UnknownUserError if nothing is there."""
    try:
        return files.open_regular(path)
    except FileNotFoundError:
        # a link to nowhere: something is there, and it is not a prefix (a regular file that
        # appeared since the open, a writer's rename, is no link: the user was not stored then)
        if os.path.islink(path) and not os.path.exists(path):
            raise CorruptError(about(user_id, f"{path.name} is a link to nothing"), user_id) from None
        raise UnknownUserError.of(user_id) from None
    except OSError as exc:
        # not a regular file, a link loop: the folder's layout; else the disk (permissions, an I/O error)
        if exc.errno in (errno.EINVAL, errno.ELOOP):
            problem = "is not a regular file" if exc.errno == errno.EINVAL else "cannot be read (a link loop)"
            raise CorruptError(about(user_id, f"{path.name} {problem}"), user_id) from None
        raise StoreIOError.of(user_id, exc, f"{path.name} cannot be read ({exc.strerror})") from None


def read_file(path: Path, user_id: str) -> tuple[bytes, os.stat_result]:
    """The whole file and its stat, from one open; UnknownUserError if there is none."""
    with open_regular(path, user_id) as fh:
        data = fh.read()
        stat = os.fstat(fh.fileno())
    return data, stat


def read_header(path: Path, user_id: str) -> tuple[FileHeader, os.stat_result]:
    """Read only the header (and stat) of a file; checks the payload length against the size."""
    with open_regular(path, user_id) as fh:
        head = fh.read(PREFIX_LEN)
        if len(head) == PREFIX_LEN and head[:4] == MAGIC:
            size = struct.unpack(">I", head[4:8])[0]
            if 1 <= size <= MAX_HEADER_BYTES:
                head += fh.read(size)
        stat = os.fstat(fh.fileno())
    header, end = parse_header(head, user_id)
    _check_payload_size(header, stat.st_size - end, user_id)
    return header, stat
