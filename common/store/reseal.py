"""Re-sealing a decrypted part: its data key re-wrapped under a new key (change_passphrase) or the
same one (a save of the user's other part: the write's parts and id), or the part re-encrypted
under a new data key (rotate_data_key, reset_rollback). Each gives the next write's (header,
file bytes, rollback record); `write` is the user's parts once that write is done, and its id."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .format import FORMAT_VERSION, FileHeader, RawKdf, ScryptKdf, UserWrite, unb64
from .keys import new_dek, new_key_id, wrap_dek
from .rollback import make_record
from .seal import seal


@dataclass(frozen=True)
class Opened:
    """A decrypted file."""

    header: FileHeader
    ciphertext: bytes
    dek: bytes
    kek: bytes
    plaintext: bytes
    stat: os.stat_result


def rewrapped(
    name: str, opened: Opened, kdf: ScryptKdf | RawKdf, kek: bytes, write: UserWrite
) -> tuple[FileHeader, bytes, bytes]:
    """The same data key wrapped under `kek` (key material `kdf`), the payload ciphertext kept
    (re-encrypted under a fresh nonce where the file is format 1: its associated data names 1)."""
    header, dek = opened.header, opened.dek
    counter = header.counter + 1
    wrapped = wrap_dek(name, header.key_id, kek, dek)
    kept = header.format_version == FORMAT_VERSION
    reuse = (unb64(header.payload_nonce), opened.ciphertext) if kept else None
    args = (header.prefix_config, header.dtype, counter, header.key_id, kdf, wrapped, dek, write)
    sealed = seal(name, *args, None if kept else opened.plaintext, reuse=reuse)
    return (*sealed, make_record(name, header.key_id, counter, dek))


def resealed(name: str, opened: Opened, write: UserWrite) -> tuple[FileHeader, bytes, bytes]:
    """The part as it is, under the same key, in `write`."""
    return rewrapped(name, opened, opened.header.kdf, opened.kek, write)


def retired(name: str, opened: Opened) -> tuple[FileHeader, None, bytes]:
    """A dropped part: no file, and a rollback record one write past it, so that the file put
    back is refused as an older copy (its counter is below the record's)."""
    header = opened.header
    return header, None, make_record(name, header.key_id, header.counter + 1, opened.dek)


def under_new_data_key(name: str, opened: Opened, write: UserWrite) -> tuple[FileHeader, bytes, bytes]:
    """The part re-encrypted under a new data key (new key id), wrapped under the same key."""
    header = opened.header
    counter, key_id, dek = header.counter + 1, new_key_id(), new_dek()
    wrapped = wrap_dek(name, key_id, opened.kek, dek)
    args = (header.prefix_config, header.dtype, counter, key_id, header.kdf, wrapped, dek, write, opened.plaintext)
    return (*seal(name, *args), make_record(name, key_id, counter, dek))
