"""The store's public face: ``PrefixStore`` (save, load, verify, list, delete, key changes).

Each operation is built from the package's parts: file format (format.py), keys
(keys.py), sealing (seal.py), payload (payload.py), locks (locking.py) and rollback
state (rollback.py).

Load order: parse strictly -> owner -> unwrap DEK (fails: wrong key, or a damaged key
block: salt, kdf parameters, wrapped DEK, user or key id) -> header MAC and payload tag
(fail after a good unwrap: tampered) -> base fingerprint -> rollback counter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError
from ..files import atomic_write_bytes, fsync_dir
from ..prefix import Prefix, PrefixSpec
from .errors import StoreError, UnknownUserError, WrongBaseError, WrongUserError, about
from .format import FILE_SUFFIX, MAX_SCRYPT_N, FileHeader, parse_file, read_file, read_header, unb64, validate_user_id
from .keys import DEFAULT_SCRYPT_N, MIN_SCRYPT_N, KekCache, Key, check_key, new_dek, new_key_id, unwrap_dek, wrap_dek
from .locking import file_lock, remove_temp_files
from .payload import check_load_dtype, decode_payload, encode_payload, storage_dtype_name
from .rollback import check_counter, read_counters, record_counter
from .seal import check_header_mac, open_payload, seal

__all__ = ["PrefixStore", "StoredPrefixInfo"]


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


def _check_owner(user_id: str, header: FileHeader) -> None:
    if header.user_id != user_id:
        raise WrongUserError(
            about(user_id, f"the file holds the prefix of user {header.user_id!r} (copied or renamed)"), user_id
        )


@dataclass(frozen=True)
class _Opened:
    """A decrypted file."""

    header: FileHeader
    ciphertext: bytes
    dek: bytes
    kek: bytes
    plaintext: bytes
    stat: os.stat_result


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
        # Derived KEKs (never the passphrases): the scrypt cost is paid once per unlock.
        self._kek_cache = KekCache()

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
        key = check_key(user_id, key)
        dtype_name = storage_dtype_name(dtype)
        plaintext = encode_payload(prefix, dtype_name)
        with self._user_lock(user_id):
            remove_temp_files(self.root, f"{user_id}{FILE_SUFFIX}")
            known = self._known_counter(user_id)
            if path.exists():
                # Reuse the DEK (and KDF salt): unwrapping it proves the caller owns this
                # prefix, so nobody overwrites a user's prefix without their key.
                header, _ = read_header(path, user_id)
                _check_owner(user_id, header)
                dek = unwrap_dek(user_id, header, self._kek_cache.kek(user_id, header.kdf, key))
                check_header_mac(user_id, header, dek)  # the counter we continue from is genuine
                kdf, wrapped, key_id = header.kdf, header.wrapped_dek, header.key_id
                counter = max(header.counter, known) + 1
            else:
                kdf, kek = self._kek_cache.new_kek(user_id, key, self.scrypt_n)
                dek, key_id, counter = new_dek(), new_key_id(), known + 1
                wrapped = wrap_dek(user_id, key_id, kek, dek)
            header, data = seal(user_id, prefix.config, dtype_name, counter, key_id, kdf, wrapped, dek, plaintext)
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
        check_load_dtype(dtype)
        opened = self._decrypt(user_id, key, base_fingerprint)
        return decode_payload(user_id, opened.plaintext, opened.header.prefix_config, opened.header.dtype, dtype)

    def verify(self, user_id: str, key: Key) -> StoredPrefixInfo:
        """Decrypt and check `user_id`'s prefix completely; returns its info or raises StoreError."""
        opened = self._decrypt(user_id, key, None)
        header = opened.header
        decode_payload(user_id, opened.plaintext, header.prefix_config, header.dtype, None)
        return _info(self.path_for(user_id), header, opened.stat)

    def info(self, user_id: str) -> StoredPrefixInfo:
        """Header information of one user's prefix (no key needed, nothing authenticated)."""
        path = self.path_for(user_id)
        header, stat = read_header(path, user_id)
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
                header, stat = read_header(path, name)
                if header.user_id != name:
                    raise WrongUserError(about(name, f"file holds the prefix of user {header.user_id!r}"), name)
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
                raise UnknownUserError(about(user_id, "no prefix is stored for this user"), user_id) from None
            remove_temp_files(self.root, f"{user_id}{FILE_SUFFIX}")
            if self.durable:
                fsync_dir(self.root)

    def change_passphrase(self, user_id: str, old_key: Key, new_key: Key) -> StoredPrefixInfo:
        """Re-wrap the data key under `new_key` (passphrase or raw); the payload ciphertext is kept."""
        path = self.path_for(user_id)
        old_key = check_key(user_id, old_key)
        new_key = check_key(user_id, new_key)
        with self._user_lock(user_id):
            opened = self._decrypt(user_id, old_key, None)
            header, ciphertext, dek = opened.header, opened.ciphertext, opened.dek
            kdf, kek = self._kek_cache.new_kek(user_id, new_key, self.scrypt_n)
            counter = max(header.counter, self._known_counter(user_id)) + 1
            nonce = unb64(header.payload_nonce)
            wrapped = wrap_dek(user_id, header.key_id, kek, dek)
            header, data = seal(
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
        key = check_key(user_id, key)
        with self._user_lock(user_id):
            opened = self._decrypt(user_id, key, None)
            header, kek, plaintext = opened.header, opened.kek, opened.plaintext
            counter = max(header.counter, self._known_counter(user_id)) + 1
            key_id, dek = new_key_id(), new_dek()
            wrapped = wrap_dek(user_id, key_id, kek, dek)
            header, data = seal(
                user_id, header.prefix_config, header.dtype, counter, key_id, header.kdf, wrapped, dek, plaintext
            )
            atomic_write_bytes(path, data, durable=self.durable)
            self._record_counter(user_id, counter)
        return _info(path, header, path.stat())

    def forget_keys(self) -> None:
        """Drop every cached KEK; the next use of each passphrase pays the KDF again."""
        self._kek_cache.clear()

    # ------------------------------------------------------------------ internals

    def _decrypt(self, user_id: str, key: Key, base_fingerprint: str | None) -> _Opened:
        """Read, check (owner, base, rollback) and decrypt one user's file."""
        path = self.path_for(user_id)
        key = check_key(user_id, key)
        data, stat = read_file(path, user_id)
        header, ciphertext = parse_file(data, user_id)
        _check_owner(user_id, header)
        kek = self._kek_cache.kek(user_id, header.kdf, key)
        dek = unwrap_dek(user_id, header, kek)
        dump = check_header_mac(user_id, header, dek)
        plaintext = open_payload(user_id, dump, dek, ciphertext)
        # Checked after authentication, so these refusals are about a genuine file.
        if base_fingerprint is not None and header.base_fingerprint != base_fingerprint:
            raise WrongBaseError(
                about(
                    user_id,
                    f"stored for base {header.base_fingerprint[:12]}…, not for base {base_fingerprint[:12]}…",
                ),
                user_id,
            )
        check_counter(self.root, user_id, header.counter, self.lock_timeout, self.durable)
        return _Opened(header, ciphertext, dek, kek, plaintext, stat)

    @contextmanager
    def _user_lock(self, user_id: str) -> Iterator[None]:
        """Serialize writers of one user across processes (and threads)."""
        with file_lock(self.root / f"{user_id}.lock", self.lock_timeout, user_id):
            yield

    def _known_counter(self, user_id: str) -> int:
        """The highest write counter this store wrote or saw for `user_id` (0: none)."""
        return read_counters(self.root).get(user_id, 0)

    def _record_counter(self, user_id: str, counter: int) -> None:
        record_counter(self.root, user_id, counter, self.lock_timeout, self.durable)
