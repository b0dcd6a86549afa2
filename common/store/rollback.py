"""Rollback detection: an authenticated record of the newest write of each stored part.

Every write of ``<root>/<name>.fpx`` also writes ``<root>/.rollback/<name>.json``::

    {"counter": n, "format_version": 1, "key_id": "...", "mac": "...", "user_id": name}

canonical JSON; mac = HMAC-SHA256 under HKDF-SHA256(DEK, info "fedprefix rollback record
v1") of ``b"FPX1/rollback\\0"`` + canonical JSON of the other fields. Only the holder of
the user's key can make a record, so none can be forged, moved to another user or part,
or carried over to a new data key.

A load, and a save that would continue from the file, refuse an authenticated file
(RollbackError) when:

- the record is missing, damaged or does not authenticate under the file's data key
  (RollbackStateError: deleted or replaced, or a crash in the middle of a rotate-key);
- the record names another key id (an older file from before rotate-key or delete);
- the file's counter is below the record's (an older copy put back).

A file newer than its record (a crash between the two renames of a save) is accepted: it
is authentic, and the next save records it. ``PrefixStore.reset_rollback`` (``fedprefix
store reset-rollback``) needs the key and re-anchors the record at the current file,
re-encrypted under a new data key so that no copy from before the reset is accepted.

Order: writers rename the file first and the record second; readers read the record
first and the file second. A reader that sees a new record therefore sees that file or a
newer one, so a load racing a save never looks like a rollback. Dropping one part of a
user (save_parts' `drop`, with the user's key) moves its record one write past the file,
so the file put back is refused. Deleting a user keeps the records, so a deleted file put
back is refused once the user saved again (new data key); put back before that, it is the
user's own newest file, and accepted.

Parts (``check_parts``): each file's authenticated header also lists every part the user
had after that write and carries the write's random id; every write re-seals all of the
user's parts (a save of one part re-seals the other, under the same key), so their ids
are equal. A load refuses a file whose list differs from the parts stored, or whose id
differs from the other part's: one part deleted, a dropped part put back, an older copy
of one part put back with its record, outside the store, which would otherwise serve the
other part alone or join a stale one to it. A process killed outright between the
renames of a write left unequal ids too before writes were journalled (locking.py), which
now completes such a write under the user's next lock.

Limit: whoever kept older copies of ALL of a user's files and records (e.g. a backup of
the folder) can put them back; without state kept outside the folder this is not
detectable. ``.counters.json`` (unauthenticated, written before these records) is no
longer read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import (
    CorruptError,
    PartsMismatchError,
    RollbackError,
    RollbackStateError,
    UnknownUserError,
    UnknownVersionError,
    about,
)
from .format import FILE_SUFFIX, PARTS, FileHeader, canonical_json, open_regular, store_name

__all__ = ["RECORD_DIR", "check_parts", "check_record", "make_record", "read_record", "record_path", "user_files"]

RECORD_DIR = ".rollback"
_RECORD_FIELDS = {"counter", "format_version", "key_id", "mac", "user_id"}


def record_path(root: Path, name: str) -> Path:
    """Where the rollback record of store name `name` lives."""
    return root / RECORD_DIR / f"{name}.json"


def user_files(user_id: str) -> set[str]:
    """Every file a write of `user_id` may put in or remove (its parts and their records),
    relative to the store folder."""
    names = [store_name(user_id, part) for part in PARTS]
    return {f"{name}{FILE_SUFFIX}" for name in names} | {f"{RECORD_DIR}/{name}.json" for name in names}


def _mac(dek: bytes, body: dict) -> str:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedprefix rollback record v1").derive(dek)
    return hmac.new(key, b"FPX1/rollback\0" + canonical_json(body), hashlib.sha256).hexdigest()


def make_record(name: str, key_id: str, counter: int, dek: bytes) -> bytes:
    """The record bytes for the write `counter` of `name` under the data key `dek` (named `key_id`)."""
    body = {"counter": counter, "format_version": 1, "key_id": key_id, "user_id": name}
    return canonical_json({**body, "mac": _mac(dek, body)})


def read_record(root: Path, name: str) -> bytes | None:
    """The raw record of `name`, None if there is none; RollbackStateError if something that is
    not a regular file is there (a FIFO would block every load of the user, a device never end)."""
    path = record_path(root, name)
    try:
        with open_regular(path, name) as fh:
            return fh.read()
    except UnknownUserError:
        return None
    except CorruptError:
        raise RollbackStateError(about(name, f"its rollback record {path.name} is not a regular file"), name) from None


def _reset_hint(name: str) -> str:
    owner = name.removesuffix("@shared")
    return f"if the current file is genuine, run: fedprefix store reset-rollback {owner} --store STORE (with the key)"


def _parse(name: str, raw: bytes, dek: bytes) -> dict:
    """The authenticated record, or RollbackStateError (UnknownVersionError: a newer fedprefix's,
    which reset-rollback would rewrite in this version's format)."""
    try:
        obj = json.loads(raw)
        version = obj.get("format_version") if isinstance(obj, dict) else None
        if type(version) is int and version > 1:
            raise UnknownVersionError(
                about(
                    name,
                    f"its rollback record says format {version}: a newer fedprefix's (this one reads 1), or damaged",
                ),
                name,
            )
        if not isinstance(obj, dict) or set(obj) != _RECORD_FIELDS or obj["user_id"] != name:
            raise ValueError
        body = {k: v for k, v in obj.items() if k != "mac"}
        if type(obj["counter"]) is not int or not isinstance(obj["mac"], str):
            raise ValueError
        if not hmac.compare_digest(_mac(dek, body), obj["mac"]) or canonical_json(obj) != raw:
            raise ValueError
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError):
        raise RollbackStateError(
            about(name, f"its rollback record is damaged or not made with this data key; {_reset_hint(name)}"), name
        ) from None
    return obj


def check_record(name: str, raw: bytes | None, header: FileHeader, dek: bytes, root: Path) -> None:
    """Refuse the authenticated file `header` (data key `dek`) of the store at `root` unless its
    record allows it."""
    if raw is None:
        why = "deleted?"
        if (root / ".counters.json").exists():  # only versions before the records wrote it
            why = "this store began under a fedprefix older than rollback records, which wrote none; or deleted"
        message = f"its rollback record is missing ({why}), so an older copy cannot be ruled out; {_reset_hint(name)}"
        raise RollbackStateError(about(name, message), name)
    record = _parse(name, raw, dek)
    if record["key_id"] != header.key_id or header.counter < record["counter"]:
        raise RollbackError(
            about(
                name,
                f"file has data key {header.key_id} and write counter {header.counter}, but this store "
                f"already wrote {record['key_id']} / {record['counter']}: an older copy was put back (rollback)",
            ),
            name,
        )


def check_parts(name: str, header: FileHeader, stored: Mapping[str, str | None]) -> None:
    """Refuse the authenticated file `header` unless the parts it lists are the user's parts
    stored now, {part: write id in its header}, all from its write (format 1: no list)."""
    if header.parts is None:
        return
    if header.parts != sorted(stored):
        problem = (
            f"written with the parts {', '.join(header.parts)}; stored now: {', '.join(sorted(stored)) or 'none'} "
            "(a part deleted or put back outside the store, or a save adding or dropping one stopped halfway)"
        )
    elif other := next((part for part, write_id in stored.items() if write_id != header.write_id), None):
        problem = (
            f"its {other} part is from another write (an older copy put back, or a process killed between "
            "the renames of a save)"
        )
    else:
        return
    raise PartsMismatchError(about(name, f"{problem}; {_reset_hint(name)}"), name)
