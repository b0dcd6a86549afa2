"""Encrypted per-user prefix storage: one authenticated, encrypted file per user.

Envelope encryption: each user's prefix (payload.py) is encrypted by AES-256-GCM under a
random per-user data key (DEK); the DEK is wrapped by a key-encryption key (KEK) derived
from the user's passphrase by scrypt, or 32 raw bytes (keys.py); a MAC under the DEK
authenticates the whole plaintext header (seal.py). The byte layout of a ``.fpx`` file
and its header fields are in format.py; locks and atomic replacement in locking.py;
rollback detection in rollback.py; ``PrefixStore`` (api.py) puts them together.
Every refusal is a ``StoreError`` subclass with a ``reason`` (errors.py).

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

from .api import PrefixStore, StoredPrefixInfo
from .errors import (
    BadKeyError,
    BadUserIdError,
    CorruptError,
    RollbackError,
    StoreBusyError,
    StoreError,
    TamperedError,
    TruncatedError,
    UnknownUserError,
    UnknownVersionError,
    WrongBaseError,
    WrongKeyError,
    WrongUserError,
)
from .format import FORMAT_VERSION, KEY_BYTES, MAGIC, FileHeader, parse_file, parse_header, validate_user_id
from .keys import DEFAULT_SCRYPT_N, SCRYPT_P, SCRYPT_R

__all__ = [
    "DEFAULT_SCRYPT_N",
    "FORMAT_VERSION",
    "KEY_BYTES",
    "MAGIC",
    "SCRYPT_P",
    "SCRYPT_R",
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
