"""Per-user cache of prompt KV: a returning user's prompt is not prefilled again.

The keys and values of a prompt depend on the user's prefix (every layer attends to it),
so a cached prompt is only ever reused by the same user, unlocked with the same key, of
the same stored prefix: the `owner` (user, key digest, prefix version) that PrefixCache
hands out. vLLM learned this the hard way (`cache_salt`, CVE-2025-46570): a KV cache shared
across tenants leaks whether another tenant sent a prompt, through timing. Anonymous
requests (no prefix) are not cached for the same reason.

Like vLLM's automatic prefix caching, a request reuses the longest cached prefix of its
token ids: a chat that sends its history again, or a new question behind the same system
prompt (the chat template's fixed head is computed once per user). Entries hold the KV of
a whole prompt, and of the tokens generated after it once the request finishes; the
first `n` slots of an entry are the KV of its first `n` tokens (attention is causal), so
any common prefix of an entry can be reused. An LRU over all users bounds the bytes.

    cache = PromptCache(max_bytes=256 << 20)
    n, kv = cache.match(owner, prompt_ids)   # kv (L, 2, H, n, D): prompt_ids[:n] behind the prefix
    cache.store(owner, prompt_ids + generated, kv_of_them)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .prefix_cache import Owner


@dataclass
class PromptCacheStats:
    hits: int = 0  # requests that reused cached KV
    misses: int = 0  # requests of a user with a prefix that found nothing to reuse
    tokens_saved: int = 0  # prompt tokens not prefilled thanks to the cache
    bytes: int = 0
    entries: int = 0
    evictions: int = 0


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """owner + token ids -> KV (L, 2, H, n, D) of those tokens behind the owner's prefix; LRU bounded in bytes."""

    def __init__(
        self,
        max_bytes: int = 256 << 20,
        max_entries_per_owner: int = 16,
        current_version: Callable[[str], tuple] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entries_per_owner = max_entries_per_owner  # bounds the work of one match
        # user -> the version of their stored prefix now (PrefixCache.version); without it the
        # newest store is taken as current
        self.current_version = current_version
        self._entries: OrderedDict[tuple[Owner, tuple[int, ...]], torch.Tensor] = OrderedDict()  # LRU first
        self._by_owner: dict[Owner, list[tuple[int, ...]]] = {}
        self._by_user: dict[str, set[Owner]] = {}  # a user's owners (keys, prefix versions) with entries
        self._lock = threading.Lock()
        self.stats = PromptCacheStats()

    def match(self, owner: Owner, token_ids: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """(n, KV (L, 2, H, n, D) of token_ids[:n]) for the longest cached prefix, n < len(token_ids)
        (the last prompt token is always computed: its logits pick the first new token); (0, None)."""
        with self._lock:
            best, best_tokens = 0, None
            for tokens in self._by_owner.get(owner, ()):
                n = min(common_length(tokens, token_ids), len(token_ids) - 1)
                if n > best:
                    best, best_tokens = n, tokens
            if best_tokens is None:
                self.stats.misses += 1
                return 0, None
            self._entries.move_to_end((owner, best_tokens))
            self.stats.hits += 1
            self.stats.tokens_saved += best
            return best, self._entries[(owner, best_tokens)][:, :, :, :best]

    def store(self, owner: Owner, token_ids: Sequence[int], key_values: torch.Tensor) -> None:
        """Keep the KV (L, 2, H, n, D) of `token_ids` (n of them) for `owner`; a stored entry that
        the new one extends is replaced, and an entry that already covers it is only refreshed."""
        tokens = tuple(token_ids)
        if key_values.shape[3] != len(tokens):
            raise ValueError(f"KV of {key_values.shape[3]} slots for {len(tokens)} tokens")
        size = key_values.numel() * key_values.element_size()
        if not tokens or size > self.max_bytes:
            return
        # A request that ran behind a prefix since replaced finishes after its user's newer ones
        # stored their KV: it must neither keep its own (never matched again) nor free theirs.
        try:
            current = owner.version if self.current_version is None else self.current_version(owner.user)
        except OSError:  # the store's folder unreadable now: keep nothing rather than fail the step
            return
        with self._lock:
            self._drop_stale(owner.user, current)
            if owner.version != current:
                return
            for old in list(self._by_owner.get(owner, ())):
                if old[: len(tokens)] == tokens:  # already covered
                    self._entries.move_to_end((owner, old))
                    return
                if tokens[: len(old)] == old:  # extended by the new entry
                    self._remove(owner, old)
            mine = self._by_owner.setdefault(owner, [])
            mine.append(tokens)
            self._by_user.setdefault(owner.user, set()).add(owner)
            self._entries[(owner, tokens)] = key_values
            self.stats.bytes += size
            while len(mine) > self.max_entries_per_owner:
                self._remove(owner, mine[0], evicted=True)
            while self.stats.bytes > self.max_bytes:
                (old_owner, old_tokens), _ = next(iter(self._entries.items()))
                self._remove(old_owner, old_tokens, evicted=True)
            self.stats.entries = len(self._entries)

    def drop_user(self, user: str) -> None:
        """Forget every entry of `user` (whatever key or prefix version)."""
        with self._lock:
            self._remove_owners(list(self._by_user.get(user, ())))

    def _drop_stale(self, user: str, current: tuple) -> None:
        """A user's entries from another prefix version than `current` can never match again: free
        them now. (Looked up by user: a scan of every owner here cost O(users) per finished request.)"""
        self._remove_owners([o for o in self._by_user.get(user, ()) if o.version != current])

    def _remove_owners(self, owners: list[Owner]) -> None:
        """Remove every entry of `owners`."""
        for owner in owners:
            for tokens in list(self._by_owner[owner]):
                self._remove(owner, tokens)

    def _remove(self, owner: Owner, tokens: tuple[int, ...], evicted: bool = False) -> None:
        kv = self._entries.pop((owner, tokens))
        self.stats.bytes -= kv.numel() * kv.element_size()
        mine = self._by_owner[owner]
        mine.remove(tokens)
        if not mine:
            del self._by_owner[owner]
            users = self._by_user[owner.user]
            users.discard(owner)
            if not users:
                del self._by_user[owner.user]
        if evicted:
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)
