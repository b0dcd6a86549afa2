"""Re-sealing a decrypted part for the key changes: its data key re-wrapped under a new key
(change_passphrase), or the part re-encrypted under a new data key (rotate_data_key,
reset_rollback). Each gives the next write's (header, file bytes, rollback record)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .format import FileHeader, RawKdf, ScryptKdf, unb64
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


def rewrapped(name: str, opened: Opened, kdf: ScryptKdf | RawKdf, kek: bytes) -> tuple[FileHeader, bytes, bytes]:
    """The same data key wrapped under `kek` (new key material `kdf`), the payload ciphertext kept."""
    header, dek = opened.header, opened.dek
    counter = header.counter + 1
    wrapped = wrap_dek(name, header.key_id, kek, dek)
    reuse = (unb64(header.payload_nonce), opened.ciphertext)
    args = (header.prefix_config, header.dtype, counter, header.key_id, kdf, wrapped, dek)
    return (*seal(name, *args, reuse=reuse), make_record(name, header.key_id, counter, dek))


def under_new_data_key(name: str, opened: Opened) -> tuple[FileHeader, bytes, bytes]:
    """The part re-encrypted under a new data key (new key id), wrapped under the same key."""
    header = opened.header
    counter, key_id, dek = header.counter + 1, new_key_id(), new_dek()
    wrapped = wrap_dek(name, key_id, opened.kek, dek)
    args = (header.prefix_config, header.dtype, counter, key_id, header.kdf, wrapped, dek, opened.plaintext)
    return (*seal(name, *args), make_record(name, key_id, counter, dek))
