"""Decrypted prefixes kept in memory: an LRU bounded in bytes, each entry bound to its key.

The store holds ciphertext only; a request unlocks its own user's prefix with that
user's key (like customer-provided keys in object stores). An entry is found again only
with a digest of the same key (salted per process, the key itself is never kept), so one
user's key never reaches another user's prefix, also not through this cache. An entry
whose files changed on disk (the user trained again) is reloaded.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from fedprefix.common.protocol import shared_store_id, stored_row_prefix
from fedprefix.common.store import PrefixStore

from .unlock import UnlockGuard


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class Owner(NamedTuple):
    """Whose prefix a request runs behind: what KV derived from it (prompt_cache.py) is keyed by."""

    user: str
    key_digest: bytes  # salted per process; the key itself is never kept
    version: tuple  # the stored files' (size, mtime) when unlocked


class PrefixCache:
    """user + key -> the user's row prefix (L, 2, H, P, D): [shared ; personal], in the serving dtype.

    Entries are kept in the dtype and on the device the engine computes in, so a bfloat16
    server holds twice as many users in the same bytes and converts nothing per request.
    """

    def __init__(
        self,
        store: PrefixStore,
        base_fingerprint: str,
        max_bytes: int = 1 << 30,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        guard: UnlockGuard | None = None,
    ) -> None:
        self.store = store
        self.base_fingerprint = base_fingerprint
        self.max_bytes = max_bytes
        self.dtype, self.device = dtype, torch.device(device)
        self._salt = secrets.token_bytes(32)
        self._entries: OrderedDict[tuple[str, bytes], tuple[tuple, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()
        self.guard = guard  # bounds the unlocks of misses (not hits: a cached prefix keeps serving)

    def _digest(self, key: bytes | str) -> bytes:
        # tagged by kind: a 32-character ASCII passphrase has the same bytes as a raw key, and
        # the store tells them apart (one unlocked entry must not answer for the other)
        material = b"passphrase:" + key.encode() if isinstance(key, str) else b"raw:" + bytes(key)
        return hashlib.sha256(self._salt + material).digest()

    def version(self, user_id: str) -> tuple:
        """What identifies the stored files' current contents (inode, size and mtime of each: a
        save writes a new file and renames it over the old one, so two saves within one tick of
        a coarse clock still differ by inode)."""
        stamps = []
        for name in (user_id, shared_store_id(user_id)):
            try:
                st = os.stat(self.store.path_for(name))
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def get(self, user_id: str, key: bytes | str) -> torch.Tensor:
        """The user's prefix, decrypting on a miss; raises the store's errors (wrong key, unknown user)."""
        return self.lookup(user_id, key)[0]

    def lookup(self, user_id: str, key: bytes | str) -> tuple[torch.Tensor, Owner]:
        """(the user's prefix, its Owner), decrypting on a miss; raises the store's errors."""
        entry_key = (user_id, self._digest(key))
        version = self.version(user_id)
        owner = Owner(user_id, entry_key[1], version)
        if (kv := self._hit(entry_key, version)) is not None:
            return kv, owner
        if self.guard is None:
            return self._load_and_keep(entry_key, version, key), owner
        # the guard runs a user's unlocks in turn, and the entry is kept before the turn ends:
        # the one before may have cached it meanwhile, and then no key is derived again
        return self.guard.unlock(user_id, key, lambda: self._hit_or_load(entry_key, version, key)), owner

    def _hit(self, entry_key: tuple[str, bytes], version: tuple) -> torch.Tensor | None:
        """The cached prefix of this user and key at this version of its files, or None."""
        with self._lock:
            found = self._entries.get(entry_key)
            if found is None or found[0] != version:
                return None
            self._entries.move_to_end(entry_key)
            self.stats.hits += 1
            return found[1]

    def forget(self, user_id: str) -> None:
        """Drop every decrypted entry of `user_id` (whatever key), and the keys the store derived
        from their passphrases: nothing that opens their files stays; the next request unlocks again."""
        with self._lock:
            for entry_key in [k for k in self._entries if k[0] == user_id]:
                _, kv = self._entries.pop(entry_key)
                self.stats.bytes -= kv.numel() * kv.element_size()
            self.stats.entries = len(self._entries)
        self.store.forget_keys(user_id)

    def _hit_or_load(self, entry_key: tuple[str, bytes], version: tuple, key: bytes | str) -> torch.Tensor:
        kv = self._hit(entry_key, version)
        return self._load_and_keep(entry_key, version, key) if kv is None else kv

    def _load_and_keep(self, entry_key: tuple[str, bytes], version: tuple, key: bytes | str) -> torch.Tensor:
        """Decrypt the prefix and keep it (LRU, bounded in bytes; one larger than the whole cache is not kept)."""
        kv = self._load(entry_key[0], key)
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return kv
        with self._lock:
            old = self._entries.pop(entry_key, None)
            if old is not None:
                self.stats.bytes -= old[1].numel() * old[1].element_size()
            self._entries[entry_key] = (version, kv)
            self.stats.bytes += size
            while self.stats.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.stats.bytes -= evicted.numel() * evicted.element_size()
                self.stats.evictions += 1
            self.stats.entries = len(self._entries)
        return kv

    def _load(self, user_id: str, key: bytes | str) -> torch.Tensor:
        """Both stored parts, read together (a save between two reads could pair one save's shared
        part with another's personal part); UnknownUserError where none is stored."""
        self.stats.misses += 1
        with torch.no_grad():
            kv = stored_row_prefix(self.store.load_parts(user_id, key, self.base_fingerprint))
        return kv.to(dtype=self.dtype, device=self.device).contiguous()
