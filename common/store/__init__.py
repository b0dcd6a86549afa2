"""Encrypted per-user prefix storage: one authenticated, encrypted file per user.

Envelope encryption: each user's prefix (payload.py) is encrypted by AES-256-GCM under a
random per-user data key (DEK); the DEK is wrapped by a key-encryption key (KEK) derived
from the user's passphrase by scrypt, or 32 raw bytes (keys.py); a MAC under the DEK
authenticates the whole plaintext header (seal.py). The byte layout of a ``.fpx`` file
and its header fields and names are in format.py; locks and staged atomic writes in
locking.py; rollback records in rollback.py; ``PrefixStore`` (api.py) puts them together.
Every refusal is a ``StoreError`` subclass with a ``reason`` (errors.py).

Threat model
------------
Protects against someone who can read, copy, modify, truncate, delete or replace files in
the store folder but does not know the user's key:

- they learn nothing about the prefix values;
- any change, a file moved to another user's or part's name, a prefix for another base
  model, or an older file of a part put back is refused on load;
- rollback state cannot be reset from the folder: each part has a record
  (``.rollback/<name>.json``, rollback.py) authenticated under a key derived from that
  part's data key. A missing, damaged or foreign record, or one naming a newer write or
  another data key, makes loads, saves and ``verify`` refuse (RollbackError), until the owner
  runs ``fedprefix store reset-rollback USER`` with the key (``reset_rollback``, which
  re-encrypts under a new data key: no copy from before it is accepted after it);
- a user's parts belong together: each file's authenticated header lists every part the
  user had after that write and the write's id, and every write re-seals all of them, so one
  part deleted alone, a dropped one put back, or an older copy of one part put back with
  its record is refused on load (PartsMismatchError, rollback.check_parts); all of a user's
  parts are under one key, and ``delete`` removes them all;
- user ids cannot reach internal names: ids ending in ``@shared`` (any case) are refused,
  so ``<id>@shared``, the shared part, belongs to ``<id>`` only;
- every write of a user (a save of several parts, a key change, a delete) is all or
  nothing: against an error before its renames nothing changes, and one stopped during them
  (an error, SIGKILL, a power loss) is completed under the user's next lock, from its journal
  (locking.py); loads racing saves see the old or the new version, never an error.

Not protected:

- putting back older copies of ALL of a user's files and their rollback records together
  (e.g. restoring a backup of the whole folder, or of one user's files) is not detected: that
  needs state kept outside the folder, which this store does not keep;
- a write stopped between its renames is completed only by a later access that can write
  the folder (a save, a key change, a delete, a load that takes the user's lock); on a
  read-only copy of such a folder the user's loads refuse the mix;
- the header is plaintext (user id, base fingerprint, prefix shape, counter, size,
  timestamps are visible); anyone with write access can delete or damage files, or make
  loads refuse (detected, not prevented);
- anyone who can run code in this process or read its memory (derived KEKs are cached in
  the ``PrefixStore`` instance, see ``forget_keys``); weak passphrases (scrypt makes each
  guess expensive, no more); someone who knew an old passphrase and kept a copy of the old
  file still has the DEK after change_passphrase (call rotate_data_key too after a leak).

Files of format 1 (before the parts lists) load as before, unchecked for parts; the next
write of their user rewrites each of its files as format 2.

Stores written before the rollback records: ``.counters.json`` is no longer read, and a
part without a record is refused on load and save until its owner runs
``fedprefix store reset-rollback USER`` once.
"""

from .api import PrefixStore, StoredPrefixInfo, existing_store_folder
from .errors import (
    BadKeyError,
    BadUserIdError,
    CorruptError,
    NonFiniteError,
    PartsMismatchError,
    RollbackError,
    RollbackStateError,
    StoreBusyError,
    StoreError,
    StoreIOError,
    TamperedError,
    TruncatedError,
    UnknownUserError,
    UnknownVersionError,
    WrongBaseError,
    WrongKeyError,
    WrongUserError,
)
from .format import (
    FORMAT_VERSION,
    KEY_BYTES,
    MAGIC,
    PARTS,
    SHARED_SUFFIX,
    FileHeader,
    parse_file,
    parse_header,
    split_store_name,
    store_name,
    validate_store_name,
    validate_user_id,
)
from .keys import DEFAULT_SCRYPT_N, SCRYPT_P, SCRYPT_R

__all__ = [
    "DEFAULT_SCRYPT_N",
    "FORMAT_VERSION",
    "KEY_BYTES",
    "MAGIC",
    "PARTS",
    "SCRYPT_P",
    "SCRYPT_R",
    "SHARED_SUFFIX",
    "BadKeyError",
    "BadUserIdError",
    "CorruptError",
    "FileHeader",
    "NonFiniteError",
    "PrefixStore",
    "existing_store_folder",
    "RollbackError",
    "PartsMismatchError",
    "RollbackStateError",
    "StoreBusyError",
    "StoreError",
    "StoreIOError",
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
    "split_store_name",
    "store_name",
    "validate_store_name",
    "validate_user_id",
]
