"""Encrypted per-user prefix storage: one authenticated, encrypted file per user.

File format
-----------
One file per user, ``<root>/<user_id>.fpx`` (user ids: 1-128 of ``A-Z a-z 0-9 . _ - @``,
not starting with ``.``, so the id is its own safe file name)::

    offset   size  field
    0        4     magic, b"FPX1"
    4        4     H: header length, unsigned 32-bit big-endian, 1 .. 65536
    8        H     header: canonical JSON (sorted keys, no spaces, ASCII-only, UTF-8)
    8+H      C     payload: AES-256-GCM ciphertext, its 16-byte tag last;
                   C == header.payload_length and nothing may follow

Header fields (``FileHeader``)::

    format_version   1
    user_id          owner of the prefix
    base_fingerprint base model the prefix belongs to
    prefix_config    PrefixConfig.model_dump()
    dtype            "float32" | "float16" | "bfloat16", dtype of the stored tensors
    counter          write counter, +1 on every write of this user (rollback detection)
    key_id           16 hex digits, random, names the data key (DEK); new on rotate_data_key
    kdf              {"name": "scrypt", "salt": b64, "n", "r", "p"} or {"name": "raw"}
    wrapped_dek      {"nonce": b64 (12 B), "ciphertext": b64 (32 B DEK + 16 B tag)}
    payload_nonce    b64 (12 B)
    payload_length   C
    header_mac       64 hex digits, HMAC-SHA256 of all the other fields (see below)

The header must be byte-for-byte the canonical encoding of its parsed values, so
authenticating the values authenticates every header byte (and the length field).

Cryptography (envelope encryption; AES-256-GCM, HKDF, HMAC, scrypt from ``cryptography``)
-----------------------------------------------------------------------------------------
- DEK: a random 256-bit data key per user. Payload plaintext =
  ``safetensors.torch.save(prefix.state_tensors())``, encrypted with the DEK and a fresh
  random 96-bit nonce on every write; associated data = ``b"FPX1"`` + canonical JSON of
  the payload-describing fields (format_version, user_id, base_fingerprint,
  prefix_config, dtype, key_id, payload_nonce, payload_length).
- KEK: scrypt(passphrase, NFC-normalized UTF-8; random 16-byte salt; n, r, p as recorded)
  or 32 raw bytes the application supplies. The DEK is wrapped by AES-256-GCM under the
  KEK, associated data = ``b"FPX1/dek\\0"`` + canonical JSON {format_version, user_id,
  key_id}. Saves reuse the wrapped DEK as is; change_passphrase re-wraps it.
- header_mac = HMAC-SHA256 under HKDF-SHA256(DEK, info "fedprefix header mac v1") of
  ``b"FPX1/header\\0"`` + canonical JSON of every other header field. It covers what the
  payload's associated data leaves out (counter, kdf, wrapped DEK), and binds them to this
  payload (its nonce), so e.g. a newer counter cannot be spliced onto an older payload.
  Why not the whole header as the payload's associated data: change_passphrase must
  re-wrap the DEK and bump the counter without touching the payload ciphertext (with a
  new associated data it would have to re-encrypt, and reusing the nonce is forbidden).
- Load order: parse strictly -> owner -> unwrap DEK (fails: wrong key, or a damaged key
  block: salt, kdf parameters, wrapped DEK, user or key id) -> header MAC and payload tag
  (fail after a good unwrap: tampered) -> base fingerprint -> rollback counter.

Writes
------
Writers of one user hold ``<root>/<user_id>.lock`` (filelock) from reading the old
header to writing the new file, which replaces the old one atomically (temp file, fsync,
rename, fsync folder): a writer killed at any point leaves the previous version. The
counter state has its own lock, ``<root>/.counters.lock``, always taken second.
On a case-insensitive filesystem 'Alice' and 'alice' share one file; the owner check
then refuses the other user's file rather than mixing them up.

Threat model
------------
Protects against someone who can read, copy, modify, truncate or replace the store's
files but does not know the user's key: they learn nothing about the prefix values,
and any change, a file moved to another user's name, a prefix for another base model,
or an older file put back (rollback) is refused on load. Rollback detection keeps the
highest counter written or seen per user in ``<root>/.counters.json``; it only protects
against someone who cannot also roll back that state file (restoring a whole-folder
backup rolls back both and is not detected).
Not protected: the header is plaintext (user id, base fingerprint, prefix shape, counter,
size, timestamps are visible); anyone with write access can delete or damage files
(detected, not prevented); anyone who can run code in this process or read its memory
(derived KEKs are cached in the ``PrefixStore`` instance, see ``forget_keys``); weak
passphrases (scrypt makes each guess expensive, no more); someone who knew an old
passphrase and kept a copy of the old file still has the DEK after change_passphrase
(call rotate_data_key too after a leak).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import struct
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .errors import ConfigError, FedPrefixError, FingerprintMismatchError, ShapeError
from .files import atomic_write_bytes, fsync_dir
from .prefix import Prefix, PrefixConfig, PrefixSpec

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "BadKeyError",
    "BadUserIdError",
    "CorruptError",
    "FileHeader",
    "PrefixStore",
    "RollbackError",
    "StoreBusyError",
    "StoreError",
    "StoredPrefixInfo",
    "TamperedError",
    "TruncatedError",
    "UnknownUserError",
    "UnknownVersionError",
    "WrongBaseError",
    "WrongKeyError",
    "WrongUserError",
    "parse_file",
    "parse_header",
    "validate_user_id",
]

MAGIC = b"FPX1"
FORMAT_VERSION = 1
FILE_SUFFIX = ".fpx"
PREFIX_LEN = 8  # magic + header length
MAX_HEADER_BYTES = 64 * 1024  # a real header is ~1 KB; the cap bounds what a bad file makes us parse
MAX_PAYLOAD_BYTES = 1 << 40
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit GCM nonce
TAG_BYTES = 16
SALT_BYTES = 16
DEFAULT_SCRYPT_N = 2**17  # OWASP password storage cheat sheet: scrypt N=2^17, r=8, p=1
SCRYPT_R = 8
SCRYPT_P = 1
MIN_SCRYPT_N = 2**10  # lowest cost a store may write (tests); reading accepts what the file says
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_MEMORY = 1 << 30  # 128*n*r*p bytes; caps what a forged header can make us allocate
COUNTERS_FILE = ".counters.json"
COUNTERS_LOCK = ".counters.lock"
KEK_CACHE_SIZE = 64

_USER_ID_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_MAC_RE = re.compile(r"[0-9a-f]{64}")
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LOAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Key = str | bytes


# ---------------------------------------------------------------------------- errors


class StoreError(FedPrefixError):
    """Any refusal or failure of the prefix store; ``reason`` says which (subclasses)."""

    reason: str = "store_error"

    def __init__(self, message: str, user_id: str | None = None) -> None:
        super().__init__(message)
        self.user_id = user_id


class WrongKeyError(StoreError):
    """The key does not unwrap the user's data key (wrong key, or a damaged key block)."""

    reason = "wrong_key"


class TamperedError(StoreError):
    """The key is right but the payload fails authentication."""

    reason = "tampered"


class TruncatedError(StoreError):
    """The file ends early."""

    reason = "truncated"


class CorruptError(StoreError):
    """The file (or the store's state file) is malformed."""

    reason = "corrupt"


class WrongUserError(StoreError):
    """The file belongs to another user (copied or renamed)."""

    reason = "wrong_user"


class WrongBaseError(StoreError, FingerprintMismatchError):
    """The stored prefix belongs to another base model."""

    reason = "wrong_base"


class RollbackError(StoreError):
    """The file is older than one this store already wrote or read."""

    reason = "rollback"


class UnknownVersionError(StoreError):
    """The file has a format version this code does not know."""

    reason = "unknown_format_version"


class UnknownUserError(StoreError):
    """No prefix is stored for this user."""

    reason = "unknown_user"


class BadUserIdError(StoreError, ValueError):
    """The user id is not a valid store name."""

    reason = "bad_user_id"


class BadKeyError(StoreError, ValueError):
    """The key is neither a non-empty passphrase nor 32 raw bytes."""

    reason = "bad_key"


class StoreBusyError(StoreError):
    """Another process held the user's lock for too long."""

    reason = "busy"


def _about(user_id: str | None, problem: str) -> str:
    return f"prefix of user {user_id!r}: {problem}" if user_id is not None else f"prefix store: {problem}"


def validate_user_id(user_id: object) -> str:
    """Return `user_id` if it is a valid store name, else raise BadUserIdError."""
    if not isinstance(user_id, str) or not _USER_ID_RE.fullmatch(user_id) or user_id.startswith("."):
        shown = user_id if isinstance(user_id, str) and len(user_id) <= 140 else f"<{type(user_id).__name__}>"
        raise BadUserIdError(f"invalid user id {shown!r}: use 1-128 letters, digits or '._-@', not starting with '.'")
    return user_id


# ---------------------------------------------------------------------------- header


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Decode base64 we wrote; only for fields already validated by the header model."""
    return base64.b64decode(text, validate=True)


def _check_b64(text: str, min_len: int, max_len: int) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError("not base64") from exc
    if _b64(raw) != text:  # one encoding per value, so the bytes are canonical
        raise ValueError("not canonical base64")
    if not min_len <= len(raw) <= max_len:
        raise ValueError(f"decodes to {len(raw)} bytes, expected {min_len}..{max_len}")
    return text


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
    format_version: Literal[1]
    user_id: str
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

    @field_validator("header_mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        if not _MAC_RE.fullmatch(v):
            raise ValueError("header_mac must be 64 lowercase hex digits")
        return v

    @field_validator("user_id")
    @classmethod
    def _user(cls, v: str) -> str:
        validate_user_id(v)
        return v

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


_PAYLOAD_FIELDS = (
    "format_version",
    "user_id",
    "base_fingerprint",
    "prefix_config",
    "dtype",
    "key_id",
    "payload_nonce",
    "payload_length",
)


def _canonical(obj: Any) -> bytes:
    """The one JSON encoding we write and accept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _payload_aad(fields: dict[str, Any]) -> bytes:
    """Associated data of the payload encryption: magic + the payload-describing fields."""
    return MAGIC + _canonical({name: fields[name] for name in _PAYLOAD_FIELDS})


def _wrap_aad(user_id: str, key_id: str) -> bytes:
    """Associated data of the DEK wrap: the key block only opens for this user and key id."""
    return b"FPX1/dek\0" + _canonical({"format_version": FORMAT_VERSION, "user_id": user_id, "key_id": key_id})


def _header_mac(dek: bytes, fields: dict[str, Any]) -> str:
    """HMAC-SHA256 of every other header field under a key derived from the DEK (hex)."""
    # A subkey, so the DEK itself is only ever used as an AES-GCM key.
    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedprefix header mac v1").derive(dek)
    body = {name: value for name, value in fields.items() if name != "header_mac"}
    return hmac.new(mac_key, b"FPX1/header\0" + _canonical(body), hashlib.sha256).hexdigest()


def parse_header(data: bytes, user_id: str | None = None) -> tuple[FileHeader, int]:
    """Parse magic, length and header at the start of `data`; returns (header, payload offset).

    Raises only StoreError subclasses; `user_id` only names the user in messages.
    """
    if len(data) < len(MAGIC):
        if MAGIC.startswith(bytes(data)):
            raise TruncatedError(_about(user_id, f"file is truncated ({len(data)} bytes)"), user_id)
        raise CorruptError(_about(user_id, "not a fedprefix prefix file (bad magic bytes)"), user_id)
    if bytes(data[:4]) != MAGIC:
        raise CorruptError(_about(user_id, "not a fedprefix prefix file (bad magic bytes)"), user_id)
    if len(data) < PREFIX_LEN:
        raise TruncatedError(_about(user_id, f"file is truncated ({len(data)} bytes)"), user_id)
    (size,) = struct.unpack(">I", data[4:8])
    if not 1 <= size <= MAX_HEADER_BYTES:
        raise CorruptError(_about(user_id, f"header length {size} is out of range"), user_id)
    end = PREFIX_LEN + size
    if len(data) < end:
        raise TruncatedError(_about(user_id, f"file is truncated inside the header ({len(data)} bytes)"), user_id)
    raw = bytes(data[PREFIX_LEN:end])
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptError(_about(user_id, "header is not valid JSON"), user_id) from exc
    if not isinstance(obj, dict):
        raise CorruptError(_about(user_id, "header is not a JSON object"), user_id)
    version = obj.get("format_version")
    if type(version) is not int:  # bool is an int subclass; refuse it here
        raise CorruptError(_about(user_id, "header has no format_version"), user_id)
    if version != FORMAT_VERSION:
        raise UnknownVersionError(
            _about(user_id, f"unknown file format version {version} (this code reads version {FORMAT_VERSION})"),
            user_id,
        )
    try:
        header = FileHeader.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "header"
        raise CorruptError(_about(user_id, f"malformed header ({where}: {first['msg']})"), user_id) from None
    if _canonical(header.model_dump(mode="json")) != raw:
        # Only the canonical encoding is accepted, so the authenticated values fix every byte.
        raise CorruptError(_about(user_id, "header is not in canonical form"), user_id)
    return header, end


def parse_file(data: bytes, user_id: str | None = None) -> tuple[FileHeader, bytes]:
    """Parse a whole ``.fpx`` file into (header, payload ciphertext with tag); StoreError only."""
    header, end = parse_header(data, user_id)
    rest = len(data) - end
    if rest < header.payload_length:
        raise TruncatedError(
            _about(user_id, f"file is truncated ({rest} of {header.payload_length} payload bytes)"), user_id
        )
    if rest > header.payload_length:
        raise CorruptError(
            _about(user_id, f"{rest - header.payload_length} unexpected bytes after the payload"), user_id
        )
    return header, bytes(data[end:])


def _wrap(user_id: str, key_id: str, kek: bytes, dek: bytes) -> WrappedKey:
    """Encrypt the DEK under the KEK (fresh nonce)."""
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(kek).encrypt(nonce, dek, _wrap_aad(user_id, key_id))
    return WrappedKey(nonce=_b64(nonce), ciphertext=_b64(ciphertext))


def _seal(
    user_id: str,
    config: PrefixConfig,
    dtype_name: str,
    counter: int,
    key_id: str,
    kdf: ScryptKdf | RawKdf,
    wrapped: WrappedKey,
    dek: bytes,
    plaintext: bytes | None = None,
    reuse: tuple[bytes, bytes] | None = None,
) -> tuple[FileHeader, bytes]:
    """Encrypt `plaintext` (or keep `reuse` = (nonce, ciphertext)), MAC the header, build the file."""
    if reuse is None:
        assert plaintext is not None
        nonce = os.urandom(NONCE_BYTES)  # fresh for every encryption under this DEK
        length = len(plaintext) + TAG_BYTES
    else:
        nonce, ciphertext = reuse
        length = len(ciphertext)
    fields: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "user_id": user_id,
        "base_fingerprint": config.base_fingerprint,
        "prefix_config": config.model_dump(mode="json"),
        "dtype": dtype_name,
        "key_id": key_id,
        "payload_nonce": _b64(nonce),
        "payload_length": length,
        "counter": counter,
        "kdf": kdf.model_dump(mode="json"),
        "wrapped_dek": wrapped.model_dump(mode="json"),
    }
    if reuse is None:
        ciphertext = AESGCM(dek).encrypt(nonce, plaintext, _payload_aad(fields))
    fields["header_mac"] = _header_mac(dek, fields)
    try:
        header = FileHeader.model_validate(fields)
    except ValidationError as exc:  # e.g. an overlong base fingerprint in the prefix's config
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"prefix of user {user_id!r}: cannot store it ({where}: {first['msg']})") from None
    dump = header.model_dump(mode="json")
    if dump != fields:  # load recomputes the AAD and the MAC from the parsed header
        raise AssertionError("header does not round-trip")
    raw = _canonical(dump)
    return header, MAGIC + struct.pack(">I", len(raw)) + raw + ciphertext


# ---------------------------------------------------------------------------- info


class StoredPrefixInfo(BaseModel):
    """What the header of one stored prefix says (readable without the key).

    For a file that cannot be read, only user_id/path/size_bytes/modified are set and
    ``problem`` says what is wrong.
    """

    model_config = ConfigDict(frozen=True)

    user_id: str
    path: Path
    size_bytes: int
    modified: datetime
    base_fingerprint: str | None = None
    spec: PrefixSpec | None = None
    prefix_projection: bool | None = None
    dtype: str | None = None
    counter: int | None = None
    key_id: str | None = None
    kdf: str | None = None
    problem: str | None = None


def _info(path: Path, header: FileHeader, stat: os.stat_result) -> StoredPrefixInfo:
    return StoredPrefixInfo(
        user_id=header.user_id,
        path=path,
        size_bytes=stat.st_size,
        modified=datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc),
        base_fingerprint=header.base_fingerprint,
        spec=header.prefix_config.spec,
        prefix_projection=header.prefix_config.prefix_projection,
        dtype=header.dtype,
        counter=header.counter,
        key_id=header.key_id,
        kdf=header.kdf.name,
    )


# ---------------------------------------------------------------------------- store


@dataclass(frozen=True)
class _Opened:
    """A decrypted file."""

    header: FileHeader
    ciphertext: bytes
    dek: bytes
    kek: bytes
    plaintext: bytes
    stat: os.stat_result


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"storage dtype must be one of torch.float32, torch.float16, torch.bfloat16; got {dtype}")


def _prefix_from_state(config: PrefixConfig, tensors: dict[str, torch.Tensor]) -> Prefix:
    """``Prefix.from_state`` without its throwaway initialization.

    from_state builds the module with real (random, then zeroed) parameters and copies the
    tensors in; for a 30-layer prefix that costs milliseconds, most of a load. Here the
    module is built on the meta device and the decrypted tensors are assigned as they are.
    Anything unexpected falls back to from_state, which stays the reference.
    """
    try:
        with torch.device("meta"):
            prefix = Prefix(config, init="zero")
        if "anchor" in tensors:
            prefix.anchor = torch.empty_like(tensors["anchor"], device="meta")
        expected = {name: tuple(t.shape) for name, t in prefix.state_dict().items()}
        if expected != {name: tuple(t.shape) for name, t in tensors.items()}:
            raise ShapeError("shape mismatch")  # from_state words the error
        prefix.load_state_dict(tensors, strict=True, assign=True)
        if any(t.is_meta for t in prefix.state_dict().values()):
            raise ShapeError("tensor left on the meta device")
        return prefix
    except Exception:  # the reference path raises the proper error
        return Prefix.from_state(config, tensors)


class PrefixStore:
    """Encrypted prefixes, one file per user, in folder `path`.

    Example:
        >>> store = PrefixStore(folder)  # doctest: +SKIP
        >>> store.save("alice", prefix, "correct horse battery staple")  # doctest: +SKIP
        >>> store.load("alice", "correct horse battery staple", base.fingerprint)  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        scrypt_n: int = DEFAULT_SCRYPT_N,
        lock_timeout: float = 60.0,
        durable: bool = True,
    ) -> None:
        """Open (and create) the store folder; `scrypt_n` is the cost for newly set passphrases.

        ``durable=False`` skips the fsyncs: writes stay atomic against a killed process
        but a power loss may lose them (for scratch stores on tmpfs and benchmarks).
        """
        if type(scrypt_n) is not int or scrypt_n & (scrypt_n - 1) or not MIN_SCRYPT_N <= scrypt_n <= MAX_SCRYPT_N:
            raise ConfigError(f"scrypt_n must be a power of two in {MIN_SCRYPT_N}..{MAX_SCRYPT_N}, got {scrypt_n!r}")
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.scrypt_n = scrypt_n
        self.lock_timeout = lock_timeout
        self.durable = durable
        # Derived KEKs, keyed by an HMAC under a per-instance secret of (user, kdf params,
        # passphrase): the passphrase itself is never stored, and the scrypt cost is paid
        # once per unlock rather than on every save/load.
        self._kek_cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_secret = os.urandom(32)
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PrefixStore({str(self.root)!r})"

    # ------------------------------------------------------------------ public API

    def path_for(self, user_id: str) -> Path:
        """The file that holds `user_id`'s prefix (validates the id)."""
        return self.root / f"{validate_user_id(user_id)}{FILE_SUFFIX}"

    def exists(self, user_id: str) -> bool:
        """True when a prefix file exists for `user_id`."""
        return self.path_for(user_id).is_file()

    def save(self, user_id: str, prefix: Prefix, key: Key, dtype: torch.dtype = torch.float32) -> StoredPrefixInfo:
        """Encrypt and store `prefix` for `user_id`; an existing user's key must match."""
        path = self.path_for(user_id)
        key = self._check_key(user_id, key)
        dtype_name = _dtype_name(dtype)
        if not isinstance(prefix, Prefix):
            raise ConfigError(f"save expects a Prefix, got {type(prefix).__name__}")
        tensors = {
            name: t.detach().to(device="cpu", dtype=_DTYPES[dtype_name]).contiguous()
            for name, t in prefix.state_tensors().items()
        }
        plaintext = safetensors_save(tensors)
        with self._user_lock(user_id):
            self._remove_temp_files(f"{user_id}{FILE_SUFFIX}")
            known = self._counters().get(user_id, 0)
            if path.exists():
                # Reuse the DEK (and KDF salt): unwrapping it proves the caller owns this
                # prefix, so nobody overwrites a user's prefix without their key.
                header, _ = self._read_header(path, user_id)
                self._check_owner(user_id, header)
                dek = self._unwrap(user_id, header, self._kek(user_id, header.kdf, key))
                self._check_header_mac(user_id, header, dek)  # the counter we continue from is genuine
                kdf, wrapped, key_id = header.kdf, header.wrapped_dek, header.key_id
                counter = max(header.counter, known) + 1
            else:
                kdf, kek = self._new_kek(user_id, key)
                dek, key_id, counter = os.urandom(KEY_BYTES), secrets.token_hex(8), known + 1
                wrapped = _wrap(user_id, key_id, kek, dek)
            header, data = _seal(user_id, prefix.config, dtype_name, counter, key_id, kdf, wrapped, dek, plaintext)
            atomic_write_bytes(path, data, durable=self.durable)
            self._record_counter(user_id, counter)
        return _info(path, header, path.stat())

    def load(
        self,
        user_id: str,
        key: Key,
        base_fingerprint: str | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> Prefix:
        """Decrypt `user_id`'s prefix; refuses another base (unless None), rollback and tampering.

        `dtype` is the returned prefix's dtype (None: as stored).
        """
        if dtype is not None and dtype not in _LOAD_DTYPES:
            raise ConfigError(f"load dtype must be float32, float16, bfloat16, float64 or None; got {dtype}")
        prefix, _, _ = self._open(user_id, key, base_fingerprint, dtype)
        return prefix

    def verify(self, user_id: str, key: Key) -> StoredPrefixInfo:
        """Decrypt and check `user_id`'s prefix completely; returns its info or raises StoreError."""
        _, header, stat = self._open(user_id, key, None, None)
        return _info(self.path_for(user_id), header, stat)

    def info(self, user_id: str) -> StoredPrefixInfo:
        """Header information of one user's prefix (no key needed, nothing authenticated)."""
        path = self.path_for(user_id)
        header, stat = self._read_header(path, user_id)
        return _info(path, header, stat)

    def list(self) -> list[StoredPrefixInfo]:
        """Headers of every stored prefix, sorted by user (no key needed); bad files get `problem`."""
        infos = []
        for path in sorted(self.root.glob(f"*{FILE_SUFFIX}")):
            name = path.name[: -len(FILE_SUFFIX)]
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            base = {
                "user_id": name,
                "path": path,
                "size_bytes": stat.st_size,
                "modified": datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc),
            }
            try:
                validate_user_id(name)
                header, stat = self._read_header(path, name)
                if header.user_id != name:
                    raise WrongUserError(_about(name, f"file holds the prefix of user {header.user_id!r}"), name)
            except UnknownUserError:  # deleted while listing
                continue
            except StoreError as exc:
                infos.append(StoredPrefixInfo(**base, problem=str(exc)))
                continue
            infos.append(_info(path, header, stat))
        return infos

    def delete(self, user_id: str) -> None:
        """Remove `user_id`'s prefix file (its counter is kept, so an old copy stays refused)."""
        path = self.path_for(user_id)
        with self._user_lock(user_id):
            try:
                path.unlink()
            except FileNotFoundError:
                raise UnknownUserError(_about(user_id, "no prefix is stored for this user"), user_id) from None
            self._remove_temp_files(f"{user_id}{FILE_SUFFIX}")
            if self.durable:
                fsync_dir(self.root)

    def change_passphrase(self, user_id: str, old_key: Key, new_key: Key) -> StoredPrefixInfo:
        """Re-wrap the data key under `new_key` (passphrase or raw); the payload ciphertext is kept."""
        path = self.path_for(user_id)
        old_key = self._check_key(user_id, old_key)
        new_key = self._check_key(user_id, new_key)
        with self._user_lock(user_id):
            opened = self._decrypt(user_id, old_key, None)
            header, ciphertext, dek = opened.header, opened.ciphertext, opened.dek
            kdf, kek = self._new_kek(user_id, new_key)
            counter = max(header.counter, self._counters().get(user_id, 0)) + 1
            nonce = _unb64(header.payload_nonce)
            wrapped = _wrap(user_id, header.key_id, kek, dek)
            header, data = _seal(
                user_id,
                header.prefix_config,
                header.dtype,
                counter,
                header.key_id,
                kdf,
                wrapped,
                dek,
                reuse=(nonce, ciphertext),
            )
            atomic_write_bytes(path, data, durable=self.durable)
            self._record_counter(user_id, counter)
        return _info(path, header, path.stat())

    def rotate_data_key(self, user_id: str, key: Key) -> StoredPrefixInfo:
        """Make a new data key (new key id) and re-encrypt the prefix under it; same `key` unlocks it."""
        path = self.path_for(user_id)
        key = self._check_key(user_id, key)
        with self._user_lock(user_id):
            opened = self._decrypt(user_id, key, None)
            header, kek, plaintext = opened.header, opened.kek, opened.plaintext
            counter = max(header.counter, self._counters().get(user_id, 0)) + 1
            key_id, dek = secrets.token_hex(8), os.urandom(KEY_BYTES)
            wrapped = _wrap(user_id, key_id, kek, dek)
            header, data = _seal(
                user_id, header.prefix_config, header.dtype, counter, key_id, header.kdf, wrapped, dek, plaintext
            )
            atomic_write_bytes(path, data, durable=self.durable)
            self._record_counter(user_id, counter)
        return _info(path, header, path.stat())

    def forget_keys(self) -> None:
        """Drop every cached KEK; the next use of each passphrase pays the KDF again."""
        with self._cache_lock:
            self._kek_cache.clear()

    # ------------------------------------------------------------------ internals

    def _check_key(self, user_id: str, key: object) -> Key:
        if isinstance(key, str):
            if not key:
                raise BadKeyError(_about(user_id, "the passphrase is empty"), user_id)
            return key
        if isinstance(key, (bytes, bytearray)):
            if len(key) != KEY_BYTES:
                raise BadKeyError(_about(user_id, f"a raw key must be {KEY_BYTES} bytes, got {len(key)}"), user_id)
            return bytes(key)
        raise BadKeyError(
            _about(user_id, f"the key must be a passphrase (str) or {KEY_BYTES} raw bytes, got {type(key).__name__}"),
            user_id,
        )

    def _kek(self, user_id: str, kdf: ScryptKdf | RawKdf, key: Key) -> bytes:
        """The KEK for an existing key block; cached for passphrases."""
        if isinstance(kdf, RawKdf):
            if not isinstance(key, bytes):
                raise WrongKeyError(
                    _about(user_id, "protected by a raw 32-byte key, but a passphrase was given"), user_id
                )
            return key
        if not isinstance(key, str):
            raise WrongKeyError(_about(user_id, "protected by a passphrase, but a raw key was given"), user_id)
        secret = unicodedata.normalize("NFC", key).encode("utf-8")
        cache_key = hmac.new(
            self._cache_secret,
            _canonical([user_id, kdf.salt, kdf.n, kdf.r, kdf.p]) + b"\0" + secret,
            hashlib.sha256,
        ).digest()
        with self._cache_lock:
            kek = self._kek_cache.get(cache_key)
            if kek is not None:
                self._kek_cache.move_to_end(cache_key)
                return kek
        try:
            kek = Scrypt(salt=_unb64(kdf.salt), length=KEY_BYTES, n=kdf.n, r=kdf.r, p=kdf.p).derive(secret)
        except (ValueError, MemoryError) as exc:
            raise StoreError(_about(user_id, f"cannot derive the key ({type(exc).__name__})"), user_id) from None
        with self._cache_lock:
            self._kek_cache[cache_key] = kek
            while len(self._kek_cache) > KEK_CACHE_SIZE:
                self._kek_cache.popitem(last=False)
        return kek

    def _new_kek(self, user_id: str, key: Key) -> tuple[ScryptKdf | RawKdf, bytes]:
        """A fresh key block's KDF (new salt) and its KEK."""
        if isinstance(key, bytes):
            kdf: ScryptKdf | RawKdf = RawKdf(name="raw")
        else:
            kdf = ScryptKdf(name="scrypt", salt=_b64(os.urandom(SALT_BYTES)), n=self.scrypt_n, r=SCRYPT_R, p=SCRYPT_P)
        return kdf, self._kek(user_id, kdf, key)

    def _unwrap(self, user_id: str, header: FileHeader, kek: bytes) -> bytes:
        """The DEK, or WrongKeyError."""
        aad = _wrap_aad(header.user_id, header.key_id)
        try:
            dek = AESGCM(kek).decrypt(_unb64(header.wrapped_dek.nonce), _unb64(header.wrapped_dek.ciphertext), aad)
        except InvalidTag:
            raise WrongKeyError(_about(user_id, "wrong key (or the file was tampered with)"), user_id) from None
        return dek

    def _read_header(self, path: Path, user_id: str) -> tuple[FileHeader, os.stat_result]:
        """Read only the header (and stat) of a file; checks the payload length against the size."""
        try:
            with open(path, "rb") as fh:
                head = fh.read(PREFIX_LEN)
                if len(head) == PREFIX_LEN and head[:4] == MAGIC:
                    size = struct.unpack(">I", head[4:8])[0]
                    if 1 <= size <= MAX_HEADER_BYTES:
                        head += fh.read(size)
                stat = os.fstat(fh.fileno())
        except FileNotFoundError:
            raise UnknownUserError(_about(user_id, "no prefix is stored for this user"), user_id) from None
        header, end = parse_header(head, user_id)
        rest = stat.st_size - end
        if rest < header.payload_length:
            raise TruncatedError(
                _about(user_id, f"file is truncated ({rest} of {header.payload_length} payload bytes)"), user_id
            )
        if rest > header.payload_length:
            raise CorruptError(
                _about(user_id, f"{rest - header.payload_length} unexpected bytes after the payload"), user_id
            )
        return header, stat

    def _check_header_mac(self, user_id: str, header: FileHeader, dek: bytes) -> dict[str, Any]:
        """Raise TamperedError unless header_mac matches; returns the header's JSON dump."""
        dump = header.model_dump(mode="json")
        if not hmac.compare_digest(_header_mac(dek, dump), header.header_mac):
            raise TamperedError(
                _about(user_id, "the key is right but the header fails authentication (tampered or damaged)"), user_id
            )
        return dump

    def _check_owner(self, user_id: str, header: FileHeader) -> None:
        if header.user_id != user_id:
            raise WrongUserError(
                _about(user_id, f"the file holds the prefix of user {header.user_id!r} (copied or renamed)"), user_id
            )

    def _decrypt(self, user_id: str, key: Key, base_fingerprint: str | None) -> _Opened:
        """Read, check (owner, base, rollback) and decrypt one user's file."""
        path = self.path_for(user_id)
        key = self._check_key(user_id, key)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
                stat = os.fstat(fh.fileno())
        except FileNotFoundError:
            raise UnknownUserError(_about(user_id, "no prefix is stored for this user"), user_id) from None
        header, ciphertext = parse_file(data, user_id)
        self._check_owner(user_id, header)
        kek = self._kek(user_id, header.kdf, key)
        dek = self._unwrap(user_id, header, kek)
        dump = self._check_header_mac(user_id, header, dek)
        try:
            plaintext = AESGCM(dek).decrypt(_unb64(header.payload_nonce), ciphertext, _payload_aad(dump))
        except InvalidTag:
            raise TamperedError(
                _about(user_id, "the key is right but the prefix data fails authentication (tampered or damaged)"),
                user_id,
            ) from None
        # Checked after authentication, so these refusals are about a genuine file.
        if base_fingerprint is not None and header.base_fingerprint != base_fingerprint:
            raise WrongBaseError(
                _about(
                    user_id,
                    f"stored for base {header.base_fingerprint[:12]}…, not for base {base_fingerprint[:12]}…",
                ),
                user_id,
            )
        known = self._counters().get(user_id, 0)
        if header.counter < known:
            raise RollbackError(
                _about(
                    user_id,
                    f"file has write counter {header.counter} but this store already wrote {known}: "
                    "an older copy was put back (rollback)",
                ),
                user_id,
            )
        if header.counter > known:
            # Authenticated and newer than the state file (e.g. a crash between the two
            # writes of save): remember it so older copies are refused from now on.
            self._record_counter(user_id, header.counter)
        return _Opened(header, ciphertext, dek, kek, plaintext, stat)

    def _open(
        self, user_id: str, key: Key, base_fingerprint: str | None, dtype: torch.dtype | None
    ) -> tuple[Prefix, FileHeader, os.stat_result]:
        opened = self._decrypt(user_id, key, base_fingerprint)
        header, plaintext, stat = opened.header, opened.plaintext, opened.stat
        stored = _DTYPES[header.dtype]
        try:
            tensors = safetensors_load(plaintext)
            if any(t.dtype != stored for t in tensors.values()):
                raise ShapeError(f"tensors are not all {header.dtype}")
            if dtype is not None:
                tensors = {name: t.to(dtype) for name, t in tensors.items()}
            prefix = _prefix_from_state(header.prefix_config, tensors)
        except (SafetensorError, ShapeError, RuntimeError, ValueError, KeyError) as exc:
            # Authenticated, so written by this code with the key: a bug or a format clash.
            raise CorruptError(_about(user_id, f"stored tensors do not form the prefix ({exc})"), user_id) from None
        return prefix, header, stat

    @contextmanager
    def _user_lock(self, user_id: str) -> Iterator[None]:
        """Serialize writers of one user across processes (and threads)."""
        with self._file_lock(self.root / f"{user_id}.lock", user_id):
            yield

    @contextmanager
    def _file_lock(self, path: Path, user_id: str | None) -> Iterator[None]:
        lock = FileLock(path, timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise StoreBusyError(
                _about(user_id, f"{path.name} stayed locked for {self.lock_timeout:g} s by another writer"), user_id
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _counters(self) -> dict[str, int]:
        """Highest write counter written or seen per user (rollback state)."""
        path = self.root / COUNTERS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            obj = json.loads(raw)
            counters = obj["counters"]
            if obj.get("format_version") != 1 or not isinstance(counters, dict):
                raise ValueError
            if not all(isinstance(k, str) and type(v) is int for k, v in counters.items()):
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError):
            raise CorruptError(
                _about(None, f"rollback state {path} is damaged; restore it or remove it to reset rollback checks")
            ) from None
        return counters

    def _record_counter(self, user_id: str, counter: int) -> None:
        """Raise the stored counter of `user_id` to `counter` (never lowers it)."""
        with self._file_lock(self.root / COUNTERS_LOCK, user_id):
            self._remove_temp_files(COUNTERS_FILE)
            counters = self._counters()
            if counters.get(user_id, 0) >= counter:
                return
            counters[user_id] = counter
            # The counter file's data is synced, its rename is not: after a power loss it may
            # lag the prefix file (never lead it: that file was fully synced first), which
            # weakens rollback detection for that one version only and saves an fsync per save.
            atomic_write_bytes(
                self.root / COUNTERS_FILE,
                _canonical({"format_version": 1, "counters": counters}),
                durable=self.durable,
                sync_dir=False,
            )

    def _remove_temp_files(self, target: str) -> None:
        """Remove temp files a killed writer of `target` left (atomic_write_bytes names them
        ``.<target>.*.tmp``); callers hold the lock of `target`, so no live writer owns one."""
        # mkstemp adds exactly 8 random characters; the fixed length keeps the pattern from
        # matching another user's temp file (user "a" vs user "a.fpx.b").
        for tmp in self.root.glob(f".{target}.????????.tmp"):
            tmp.unlink(missing_ok=True)
