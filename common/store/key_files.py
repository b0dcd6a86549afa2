"""Raw key files (32 bytes, or 64 hex digits): made readable by their owner only, and read
by the CLI, nodes and anyone else with one rule.

A key file opens every prefix stored under it, so it is created with mode 0600 and never
overwritten (a lost key is a lost store), and reading one that other users may read is
warned about, as ssh does for private keys (it refuses them; a warning keeps existing
set-ups working).
"""

from __future__ import annotations

import logging
import os
import stat
from contextlib import suppress
from pathlib import Path

from fedprefix.common.files import fsync_dir, open_regular, sync

from .errors import BadKeyError
from .format import KEY_BYTES

log = logging.getLogger(__name__)

KEY_FILE_MAX = 1024  # bytes read from a key file: a key is 32 bytes or 64 hex digits (/dev/zero never ends)


def write_key_file(path: str | os.PathLike, key: bytes | None = None) -> bytes:
    """Write `key` (default: 32 fresh random bytes) to a new file `path` that only its owner
    can read; returns the key. An existing file is refused, never replaced."""
    key = os.urandom(KEY_BYTES) if key is None else key
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        what = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__  # never the key itself
        raise BadKeyError(f"a key file holds {KEY_BYTES} raw bytes, got {what}")
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BadKeyError(
            f"key file {path} exists already: not replaced (the prefixes stored under it would be lost); "
            "read_key_file reads it, or move it away together with the stores it opens"
        ) from None
    except OSError as exc:
        raise BadKeyError(f"cannot create key file {path}: {exc.strerror}") from None
    # On the drive before anything is stored under it (stores are fsynced): after a power loss
    # the prefixes must not outlive their key. A write that fails leaves no empty key file,
    # which a second try would take for an existing key.
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            sync(fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise BadKeyError(f"cannot write key file {path}: {exc.strerror}") from None
    with suppress(OSError):  # the file is whole; a filesystem that refuses a folder's fsync keeps it too
        fsync_dir(path.parent)
    return key


def read_key_file(path: str | os.PathLike) -> bytes:
    """The 32-byte key in `path` (raw or as hex digits); BadKeyError naming the file otherwise."""
    try:
        with open_regular(Path(path).expanduser()) as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read(KEY_FILE_MAX + 1)
    except OSError as exc:
        raise BadKeyError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("key file %s can be read by other users (mode %o): chmod 600 %s", path, mode & 0o777, path)
    if len(data) > KEY_FILE_MAX:
        raise BadKeyError(f"key file {path} is larger than {KEY_FILE_MAX} bytes: not a key")
    if len(data) == KEY_BYTES:
        return data
    text = b"".join(data.split())  # hex digits, in groups or lines as some tools write them
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise BadKeyError(f"key file {path} must hold {KEY_BYTES} raw bytes or {2 * KEY_BYTES} hex digits")
