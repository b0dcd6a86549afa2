"""Keys of the envelope encryption: the user's key -> KEK (scrypt or raw), which wraps the DEK.

- DEK: a random 256-bit data key per user, named by a random 16-hex-digit key id; it
  encrypts the payload (seal.py). A new one only on rotate_data_key.
- KEK: scrypt(passphrase, NFC-normalized UTF-8; random 16-byte salt; n, r, p as recorded
  in the header) or 32 raw bytes the application supplies. The DEK is wrapped by
  AES-256-GCM under the KEK, associated data = ``b"FPX1/dek\\0"`` + canonical JSON
  {format_version: 1, user_id, key_id}, so a key block only opens for its user and key id.
  Saves reuse the wrapped DEK as is; change_passphrase re-wraps it.
- Derived KEKs are cached per ``KekCache`` (one per PrefixStore), keyed by an HMAC under a
  per-instance secret, so the scrypt cost is paid once per unlock, not on every save/load.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import unicodedata
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import BadKeyError, StoreError, WrongKeyError, about
from .format import (
    KEY_BYTES,
    NONCE_BYTES,
    SALT_BYTES,
    FileHeader,
    RawKdf,
    ScryptKdf,
    WrappedKey,
    b64,
    canonical_json,
    new_key_id,
    unb64,
)

__all__ = [
    "DEFAULT_SCRYPT_N",
    "MIN_SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "Key",
    "KekCache",
    "check_key",
    "new_dek",
    "new_key_id",
    "unwrap_dek",
    "wrap_dek",
]

DEFAULT_SCRYPT_N = 2**17  # OWASP password storage cheat sheet: scrypt N=2^17, r=8, p=1
SCRYPT_R = 8
SCRYPT_P = 1
MIN_SCRYPT_N = 2**10  # lowest cost a store may write (tests); reading accepts what the file says
# passphrase KEKs kept (~200 bytes each): a server's decrypted-prefix cache holds thousands of
# users, and with 64 every one of them past the 64th paid a full scrypt (0.4-1.3 s) on each miss
KEK_CACHE_SIZE = 4096

Key = str | bytes


def check_key(user_id: str, key: object) -> Key:
    """`key` as a non-empty passphrase or 32 raw bytes (bytearray copied), else BadKeyError."""
    if isinstance(key, str):
        if not key:
            raise BadKeyError(about(user_id, "the passphrase is empty"), user_id)
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (bytes that are not UTF-8, read by Python)
            raise BadKeyError(about(user_id, "the passphrase is not valid Unicode text"), user_id) from None
        return key
    if isinstance(key, (bytes, bytearray)):
        if len(key) != KEY_BYTES:
            raise BadKeyError(about(user_id, f"a raw key must be {KEY_BYTES} bytes, got {len(key)}"), user_id)
        return bytes(key)
    raise BadKeyError(
        about(user_id, f"the key must be a passphrase (str) or {KEY_BYTES} raw bytes, got {type(key).__name__}"),
        user_id,
    )


def new_dek() -> bytes:
    """A fresh random data key."""
    return os.urandom(KEY_BYTES)


def _wrap_aad(user_id: str, key_id: str) -> bytes:
    """Associated data of the DEK wrap: the key block only opens for this user and key id."""
    # The key block's own version, 1 in file formats 1 and 2: a format-1 data key re-wrapped stays readable
    return b"FPX1/dek\0" + canonical_json({"format_version": 1, "user_id": user_id, "key_id": key_id})


def wrap_dek(user_id: str, key_id: str, kek: bytes, dek: bytes) -> WrappedKey:
    """Encrypt the DEK under the KEK (fresh nonce)."""
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(kek).encrypt(nonce, dek, _wrap_aad(user_id, key_id))
    return WrappedKey(nonce=b64(nonce), ciphertext=b64(ciphertext))


def unwrap_dek(user_id: str, header: FileHeader, kek: bytes) -> bytes:
    """The DEK, or WrongKeyError."""
    aad = _wrap_aad(header.user_id, header.key_id)
    try:
        dek = AESGCM(kek).decrypt(unb64(header.wrapped_dek.nonce), unb64(header.wrapped_dek.ciphertext), aad)
    except InvalidTag:
        raise WrongKeyError(about(user_id, "wrong key (or the file was tampered with)"), user_id) from None
    return dek


class KekCache:
    """Derives KEKs and keeps the last `size` derived from passphrases.

    Entries are keyed by an HMAC under a per-instance secret of (user, kdf params,
    passphrase): the passphrase itself is never stored.
    """

    def __init__(self, size: int = KEK_CACHE_SIZE) -> None:
        """An empty cache holding at most `size` KEKs."""
        self.size = size
        self.entries: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()  # HMAC digest -> (user, KEK), oldest first
        self._secret = os.urandom(32)
        self._lock = threading.Lock()

    def kek(self, user_id: str, kdf: ScryptKdf | RawKdf, key: Key) -> bytes:
        """The KEK for an existing key block; cached for passphrases."""
        if isinstance(kdf, RawKdf):
            if not isinstance(key, bytes):
                raise WrongKeyError(
                    about(user_id, "protected by a raw 32-byte key, but a passphrase was given"), user_id
                )
            return key
        if not isinstance(key, str):
            raise WrongKeyError(about(user_id, "protected by a passphrase, but a raw key was given"), user_id)
        secret = unicodedata.normalize("NFC", key).encode("utf-8")
        cache_key = hmac.new(
            self._secret,
            canonical_json([user_id, kdf.salt, kdf.n, kdf.r, kdf.p]) + b"\0" + secret,
            hashlib.sha256,
        ).digest()
        with self._lock:
            found = self.entries.get(cache_key)
            if found is not None:
                self.entries.move_to_end(cache_key)
                return found[1]
        try:
            kek = Scrypt(salt=unb64(kdf.salt), length=KEY_BYTES, n=kdf.n, r=kdf.r, p=kdf.p).derive(secret)
        except (ValueError, MemoryError) as exc:
            raise StoreError(about(user_id, f"cannot derive the key ({type(exc).__name__})"), user_id) from None
        with self._lock:
            self.entries[cache_key] = (user_id, kek)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return kek

    def new_kek(self, user_id: str, key: Key, scrypt_n: int) -> tuple[ScryptKdf | RawKdf, bytes]:
        """A fresh key block's KDF (new salt, cost `scrypt_n` for a passphrase) and its KEK."""
        if isinstance(key, bytes):
            kdf: ScryptKdf | RawKdf = RawKdf(name="raw")
        else:
            kdf = ScryptKdf(name="scrypt", salt=b64(os.urandom(SALT_BYTES)), n=scrypt_n, r=SCRYPT_R, p=SCRYPT_P)
        return kdf, self.kek(user_id, kdf, key)

    def clear(self, user_id: str | None = None) -> None:
        """Drop every cached KEK, or those of `user_id`."""
        with self._lock:
            for cache_key in [k for k, (user, _) in self.entries.items() if user_id in (None, user)]:
                del self.entries[cache_key]
