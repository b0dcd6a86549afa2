"""Rollback detection: the highest write counter written or seen per user.

Every write raises the user's header ``counter`` by one and records it in
``<root>/.counters.json`` (``{"format_version": 1, "counters": {user: n}}``, canonical
JSON), under ``<root>/.counters.lock``. A load refuses an authenticated file whose
counter is below the recorded one (an older copy put back) and records a higher one it
meets (e.g. after a crash between the two writes of a save). Deleting a prefix keeps its
counter, so the deleted file put back stays refused.

Limit: this only protects against someone who cannot also roll back the state file
(restoring a whole-folder backup rolls back both and is not detected).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_bytes
from .errors import CorruptError, RollbackError, about
from .format import canonical_json
from .locking import file_lock, remove_temp_files

__all__ = ["COUNTERS_FILE", "COUNTERS_LOCK", "check_counter", "read_counters", "record_counter"]

COUNTERS_FILE = ".counters.json"
COUNTERS_LOCK = ".counters.lock"


def read_counters(root: Path) -> dict[str, int]:
    """Highest write counter written or seen per user (rollback state); {} when there is none."""
    path = root / COUNTERS_FILE
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
            about(None, f"rollback state {path} is damaged; restore it or remove it to reset rollback checks")
        ) from None
    return counters


def record_counter(root: Path, user_id: str, counter: int, lock_timeout: float, durable: bool) -> None:
    """Raise the stored counter of `user_id` to `counter` (never lowers it)."""
    with file_lock(root / COUNTERS_LOCK, lock_timeout, user_id):
        remove_temp_files(root, COUNTERS_FILE)
        counters = read_counters(root)
        if counters.get(user_id, 0) >= counter:
            return
        counters[user_id] = counter
        # The counter file's data is synced, its rename is not: after a power loss it may
        # lag the prefix file (never lead it: that file was fully synced first), which
        # weakens rollback detection for that one version only and saves an fsync per save.
        atomic_write_bytes(
            root / COUNTERS_FILE,
            canonical_json({"format_version": 1, "counters": counters}),
            durable=durable,
            sync_dir=False,
        )


def check_counter(root: Path, user_id: str, counter: int, lock_timeout: float, durable: bool) -> None:
    """Refuse an authenticated file with write counter `counter` if it is older than the state says."""
    known = read_counters(root).get(user_id, 0)
    if counter < known:
        raise RollbackError(
            about(
                user_id,
                f"file has write counter {counter} but this store already wrote {known}: "
                "an older copy was put back (rollback)",
            ),
            user_id,
        )
    if counter > known:
        # Authenticated and newer than the state file (e.g. a crash between the two
        # writes of save): remember it so older copies are refused from now on.
        record_counter(root, user_id, counter, lock_timeout, durable)
