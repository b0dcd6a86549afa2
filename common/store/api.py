"""The store's public face: ``PrefixStore`` (save, load, verify, list, delete; its key changes are in key_changes.py).

Each operation is built from the package's parts: file format (format.py), keys
(keys.py), sealing (seal.py), payload (payload.py), locks (locking.py) and rollback
state (rollback.py).

Names: reads take a store name, a user id (its personal part) or `shared_store_id`
of one (its shared part); writes take the user id and the part; key changes and delete
take the user id and cover all of its parts. Load order: rollback record (read first, see
rollback.py) -> parse strictly -> owner -> unwrap DEK (fails: wrong key, or a damaged key
block) -> header MAC and payload tag (fail after a good unwrap: tampered) -> base
fingerprint -> rollback record check -> parts check (every part from one write).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from math import inf
from pathlib import Path

import torch

from ..errors import ConfigError
from ..prefix import Prefix, PrefixConfig
from .errors import (
    RollbackError,
    StoreError,
    StoreIOError,
    UnknownUserError,
    WrongBaseError,
    WrongKeyError,
    about,
    naming_io_errors,
)
from .format import (
    FILE_SUFFIX,
    MAX_SCRYPT_N,
    PARTS,
    FileHeader,
    UserWrite,
    check_owner,
    parse_file,
    read_file,
    read_header,
    split_store_name,
    store_name,
    validate_store_name,
    validate_user_id,
)
from .info import StoredPrefixInfo, info_of_header, list_infos
from .key_changes import KeyChanges
from .keys import DEFAULT_SCRYPT_N, MIN_SCRYPT_N, KekCache, Key, check_key, new_dek, new_key_id, unwrap_dek, wrap_dek
from .locking import journal_path, remove_earlier_temp_files, write_all
from .payload import check_load_dtype, decode_payload, encode_payload, storage_dtype_name
from .reseal import Opened, resealed, retired
from .rollback import RECORD_DIR, check_parts, check_record, make_record, read_record, record_path
from .seal import check_header_mac, open_payload, seal
from .user_locks import UserLocks

__all__ = ["PrefixStore", "StoredPrefixInfo", "existing_store_folder"]


def _named_folder(path: str | os.PathLike) -> Path:
    """`path` as a Path, refusing a blank one: Path("") is the current folder, which an unset
    setting (`os.environ.get("STORE", "")`) would fill with prefixes and lock files."""
    if isinstance(path, str | os.PathLike) and not str(os.fspath(path)).strip():
        raise ConfigError("prefix store: the store folder's path is empty: name a folder ('.' for this one)")
    return Path(path)


def existing_store_folder(path: str | os.PathLike) -> Path:
    """`path` if it is a folder: a typo must not silently create (and use) an empty store."""
    if not _named_folder(path).is_dir():
        raise StoreError(f"prefix store: no store folder at {path}")
    return Path(path)


class PrefixStore(KeyChanges, UserLocks):
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
        # checked now, not at the first save after training (filelock takes a negative one as "forever")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float) or not 0 <= lock_timeout < inf:
            raise ConfigError(f"lock_timeout must be a finite number of seconds >= 0, got {lock_timeout!r}")
        if not isinstance(durable, bool):  # "no" would be taken as true
            raise ConfigError(f"durable must be True or False, got {durable!r}")
        self.root = _named_folder(path)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"prefix store: {self.root} is not a folder") from None
        except OSError as exc:
            raise StoreIOError.of(None, exc) from exc
        self.scrypt_n = scrypt_n
        self.lock_timeout = lock_timeout
        self.durable = durable
        # Derived KEKs (never the passphrases): the scrypt cost is paid once per unlock.
        self._kek_cache = KekCache()

    def __repr__(self) -> str:
        return f"PrefixStore({str(self.root)!r})"

    # ------------------------------------------------------------------ public API

    def path_for(self, name: str) -> Path:
        """The file of store name `name`: a user id, or `shared_store_id` of one (validated)."""
        return self.root / f"{validate_store_name(name)}{FILE_SUFFIX}"

    def exists(self, name: str) -> bool:
        """True when anything is at store name `name`'s path: a part replaced by a folder, a FIFO
        or a link is there, and refused when read, never skipped as if it were not stored. A
        folder that cannot be searched raises (PermissionError): its users are not unknown."""
        try:
            os.lstat(self.path_for(name))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def save(
        self, user_id: str, prefix: Prefix, key: Key, dtype: torch.dtype = torch.float32, *, part: str = "personal"
    ) -> StoredPrefixInfo:
        """Encrypt and store `prefix` as `user_id`'s `part` ('personal', 'shared'); its existing key must match."""
        return self.save_parts(user_id, {part: prefix}, key, dtype)[part]

    @naming_io_errors
    def save_parts(
        self,
        user_id: str,
        parts: Mapping[str, Prefix],
        key: Key,
        dtype: torch.dtype = torch.float32,
        *,
        drop: Sequence[str] = (),
    ) -> dict[str, StoredPrefixInfo]:
        """Store several parts of one user ({'personal': p, 'shared': s}) together: all are written or none
        (a writer killed midway leaves a journal, and the user's next lock completes the write: locking.py).

        `drop`: parts of this user to remove in the same step (a copy that replaces the shared
        part), under the same key: each is opened first, and its rollback record moved past it,
        so that the dropped file put back is refused even where it is the user's only file.
        """
        names = {part: store_name(user_id, part) for part in parts}  # validates the id once, for every name
        if not names:
            raise ConfigError(f"user {user_id!r}: save_parts got no parts to save")
        dropped = {part: store_name(user_id, part) for part in drop if part not in names}
        key = check_key(user_id, key)
        dtype_name = storage_dtype_name(dtype)
        plaintexts = {part: encode_payload(parts[part], dtype_name, name) for part, name in names.items()}
        sealed: dict[str, tuple[FileHeader, bytes, bytes]] = {}
        with self._user_lock(user_id):  # every check and encryption before anything is written
            stored = self.stored_parts(user_id)
            write = UserWrite.new((set(stored) | set(names)) - set(dropped))
            for part, name in names.items():
                sealed[name] = self._seal_next(name, parts[part].config, dtype_name, key, plaintexts[part], write)
            for part in set(stored) - set(names):  # the user's other part joins this write, same key
                name = store_name(user_id, part)
                opened = self._opened_with(name, key)
                sealed[name] = resealed(name, opened, write) if part in write.parts else retired(name, opened)
            self._commit(sealed, list(dropped.values()))
        return {part: self._info_of(name, sealed[name][0]) for part, name in names.items()}

    @naming_io_errors
    def load(
        self,
        user_id: str,
        key: Key,
        base_fingerprint: str | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> Prefix:
        """Decrypt the prefix of store name `user_id`; refuses another base (unless None), rollback and tampering.

        `dtype` is the returned prefix's dtype (None: as stored).
        """
        return self._load(user_id, key, base_fingerprint, dtype, locked=False)

    @naming_io_errors
    def load_parts(
        self, user_id: str, key: Key, base_fingerprint: str | None = None, dtype: torch.dtype | None = torch.float32
    ) -> dict[str, Prefix]:
        """Every stored part of `user_id` ({'personal': ..., 'shared': ...}), read together: under the
        user's lock, or from one write where the store cannot be written here (user_locks.py).

        UnknownUserError if none is stored.
        """
        check_load_dtype(dtype)
        names = {part: store_name(user_id, part) for part in PARTS}

        def read() -> dict[str, Opened]:
            found = {
                part: self._decrypt(name, key, base_fingerprint, locked=True)
                for part, name in names.items()
                if self.exists(name)
            }
            self._check_one_write(user_id, {part: opened.header for part, opened in found.items()})
            return found

        found = self._read_together(user_id, read)
        if not found:
            raise UnknownUserError.of(user_id)
        return {
            part: decode_payload(names[part], o.plaintext, o.header.prefix_config, o.header.dtype, dtype)
            for part, o in found.items()
        }

    @naming_io_errors
    def verify(self, user_id: str, key: Key) -> StoredPrefixInfo:
        """Decrypt and check the prefix of store name `user_id` completely; returns its info or raises StoreError."""
        return self._verify(user_id, key, locked=False)[0]

    @naming_io_errors
    def verify_user(self, user_id: str, key: Key) -> list[StoredPrefixInfo]:
        """verify() of every stored part of `user_id`, read together (as load_parts reads them)."""
        validate_user_id(user_id)

        def read() -> list[tuple[StoredPrefixInfo, FileHeader]]:
            verified = [self._verify(name, key, locked=True) for name in self._stored_names(user_id)]
            self._check_one_write(user_id, {info.path: header for info, header in verified})
            return verified

        return [info for info, _ in self._read_together(user_id, read)]

    @naming_io_errors
    def info(self, user_id: str) -> StoredPrefixInfo:
        """Header information of one stored prefix (no key needed, nothing authenticated)."""
        path = self.path_for(user_id)
        header, stat = read_header(path, user_id)
        return info_of_header(path, header, stat)

    @naming_io_errors
    def list(self) -> list[StoredPrefixInfo]:
        """Headers of every stored prefix, sorted by name (no key needed); bad files get `problem`."""
        return list_infos(self.root)

    @naming_io_errors
    def delete(self, user_id: str) -> None:
        """Remove every part of the user (their rollback records are kept: see rollback.py)."""
        validate_user_id(user_id)
        with self._stored_user_lock(user_id):
            names = self._stored_names(user_id)
            write_all(journal_path(self.root, user_id), [], [self.path_for(name) for name in names], self.durable)
            for name in names:
                remove_earlier_temp_files(self.root, f"{name}{FILE_SUFFIX}")
                remove_earlier_temp_files(self.root / RECORD_DIR, f"{name}.json")

    def stored_parts(self, user_id: str) -> list[str]:
        """The parts of `user_id` that are stored (anything at their paths), in PARTS order."""
        return [part for part in PARTS if self.exists(store_name(user_id, part))]

    def _opened_with(self, name: str, key: Key) -> Opened:
        """_decrypt of a part a write of its user re-seals or drops, naming a part under another key."""
        try:
            return self._decrypt(name, key, None, locked=True)
        except WrongKeyError as exc:
            raise WrongKeyError(
                f"{exc}; every part of a user is under one key: put {name} under this one with "
                f"fedprefix store change-passphrase (its key as the old one, this as the new)",
                name,
            ) from None

    def _write_ids(self, name: str, header: FileHeader) -> dict[str, str | None]:
        """{part: write id} of every stored part of `name`'s user: its own from `header` (authenticated),
        the other's read from its header here (authenticated when that part is loaded)."""
        user_id, own = split_store_name(name)
        ids = {own: header.write_id}
        for part in set(self.stored_parts(user_id)) - {own}:
            try:
                other = store_name(user_id, part)
                ids[part] = read_header(self.path_for(other), other)[0].write_id
            except UnknownUserError:  # dropped meanwhile: the lists then differ, and a reader retries locked
                pass
        return ids

    def _stored_names(self, user_id: str) -> list[str]:
        """The store names of every part of `user_id` that is stored; UnknownUserError if none."""
        names = [store_name(user_id, part) for part in self.stored_parts(user_id)]
        if not names:
            raise UnknownUserError.of(user_id)
        return names

    def _first_info(self, sealed: dict[str, tuple[FileHeader, bytes, bytes]]) -> StoredPrefixInfo:
        """The info of the first part written (the personal one where there is one)."""
        name, (header, _, _) = next(iter(sealed.items()))
        return self._info_of(name, header)

    def forget_keys(self, user_id: str | None = None) -> None:
        """Drop every cached KEK (or those of `user_id`); the next use of each passphrase pays the KDF again."""
        self._kek_cache.clear(user_id)

    # ------------------------------------------------------------------ internals

    def _open(self, name: str, key: Key) -> Opened:
        """Read, parse, check the owner of, and decrypt one file (no base or rollback check)."""
        data, stat = read_file(self.path_for(name), name)
        header, ciphertext = parse_file(data, name)
        check_owner(name, header)
        kek = self._kek_cache.kek(name, header.kdf, key)
        dek = unwrap_dek(name, header, kek)
        dump = check_header_mac(name, header, dek)
        plaintext = open_payload(name, dump, dek, ciphertext)
        return Opened(header, ciphertext, dek, kek, plaintext, stat)

    def _decrypt(
        self, name: str, key: Key, base_fingerprint: str | None, locked: bool = False, one_write: bool = True
    ) -> Opened:
        """Read, check (owner, base, rollback, parts) and decrypt one file; `locked`: a refusal is
        final here (the caller holds the user's lock, or reads again itself: _read_together); not
        `one_write`: the parts' lists checked, not their write ids."""
        validate_store_name(name)
        key = check_key(name, key)
        if base_fingerprint is not None and not isinstance(base_fingerprint, str):
            raise ConfigError(f"base_fingerprint must be a base's fingerprint (str) or None, got {base_fingerprint!r}")
        try:
            return self._read_checked(name, key, base_fingerprint, one_write)
        except (RollbackError, UnknownUserError, OSError) as exc:
            if locked or not self._midway(exc, name):
                raise
        # Without the lock, a write between its renames looks like a rollback for a moment; under
        # it none is midway (_user_lock completes a killed one's): a refusal is about the files.
        return self._read_together(name, lambda: self._read_checked(name, key, base_fingerprint, one_write))

    def _read_checked(self, name: str, key: Key, base_fingerprint: str | None, one_write: bool = True) -> Opened:
        record = read_record(self.root, name)  # before the file: see rollback.py
        opened = self._open(name, key)
        header = opened.header
        # Checked after authentication, so these refusals are about a genuine file.
        if base_fingerprint is not None and header.base_fingerprint != base_fingerprint:
            raise WrongBaseError(
                about(name, f"stored for base {header.base_fingerprint[:12]}…, not for base {base_fingerprint[:12]}…"),
                name,
            )
        check_record(name, record, header, opened.dek, self.root)
        ids = self._write_ids(name, header)
        check_parts(name, header, ids if one_write else dict.fromkeys(ids, header.write_id))
        return opened

    def _verify(self, name: str, key: Key, locked: bool) -> tuple[StoredPrefixInfo, FileHeader]:
        """(the info, the header) of `name` decrypted and decoded completely."""
        opened = self._decrypt(name, key, None, locked)
        header = opened.header
        decode_payload(name, opened.plaintext, header.prefix_config, header.dtype, None)
        return info_of_header(self.path_for(name), header, opened.stat), header

    def _load(
        self, name: str, key: Key, base_fingerprint: str | None, dtype: torch.dtype | None, locked: bool
    ) -> Prefix:
        check_load_dtype(dtype)
        opened = self._decrypt(name, key, base_fingerprint, locked)
        return decode_payload(name, opened.plaintext, opened.header.prefix_config, opened.header.dtype, dtype)

    def _seal_next(
        self, name: str, config: PrefixConfig, dtype_name: str, key: Key, plaintext: bytes, write: UserWrite
    ) -> tuple[FileHeader, bytes, bytes]:
        """The next version of `name` sealed (header, file bytes, rollback record); caller holds the lock."""
        path = self.path_for(name)
        if path.exists():
            # Reuse the DEK (and KDF salt): unwrapping it proves the caller owns this
            # prefix, so nobody overwrites a user's prefix without their key.
            record = read_record(self.root, name)  # before the file, as a load reads them
            header, _ = read_header(path, name)
            check_owner(name, header)
            dek = unwrap_dek(name, header, self._kek_cache.kek(name, header.kdf, key))
            check_header_mac(name, header, dek)  # the counter we continue from is genuine
            # The file must be the newest this store wrote, as for a load: continuing from an
            # older copy put back (its record deleted, or made for a retired data key) would
            # record a counter below copies someone kept, or reuse a retired data key.
            check_record(name, record, header, dek, self.root)
            check_parts(name, header, self._write_ids(name, header))  # nor from a part lost or stale
            kdf, wrapped, key_id, counter = header.kdf, header.wrapped_dek, header.key_id, header.counter + 1
        else:
            kdf, kek = self._kek_cache.new_kek(name, key, self.scrypt_n)
            dek, key_id, counter = new_dek(), new_key_id(), 1
            wrapped = wrap_dek(name, key_id, kek, dek)
        header, data = seal(name, config, dtype_name, counter, key_id, kdf, wrapped, dek, write, plaintext)
        return header, data, make_record(name, key_id, counter, dek)

    def _commit(
        self, sealed: Mapping[str, tuple[FileHeader, bytes | None, bytes]], dropped: Sequence[str] = ()
    ) -> None:
        """Write {name: (header, file bytes, record)} in one step, removing the `dropped` parts'
        files (file bytes None: only their records are written, see reseal.retired); files
        before records (rollback.py). The caller holds the user's lock."""
        files = [(self.path_for(n), data) for n, (_, data, _) in sealed.items() if data is not None]
        records = [(record_path(self.root, n), record) for n, (_, _, record) in sealed.items()]
        journal = self._journal(next(iter(sealed)))
        write_all(journal, files + records, [self.path_for(n) for n in dropped], self.durable)

    def _journal(self, name: str) -> Path:  # of the writes of `name`'s user (locking.py)
        return journal_path(self.root, split_store_name(name)[0])

    def _info_of(self, name: str, header: FileHeader) -> StoredPrefixInfo:
        path = self.path_for(name)
        return info_of_header(path, header, path.stat())
