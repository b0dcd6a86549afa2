"""Sealing a file and opening it again: payload encryption and the header MAC under the DEK.

- Payload plaintext (payload.py) is encrypted by AES-256-GCM with the DEK and a fresh
  random 96-bit nonce on every write; associated data = ``b"FPX1"`` + canonical JSON of
  the payload-describing fields (format_version, user_id, base_fingerprint,
  prefix_config, dtype, key_id, payload_nonce, payload_length).
- header_mac = HMAC-SHA256 under HKDF-SHA256(DEK, info "fedprefix header mac v1") of
  ``b"FPX1/header\\0"`` + canonical JSON of every other header field. It covers what the
  payload's associated data leaves out (counter, parts, write id, kdf, wrapped DEK), and binds them to this
  payload (its nonce), so e.g. a newer counter cannot be spliced onto an older payload.
  Why not the whole header as the payload's associated data: change_passphrase must
  re-wrap the DEK and bump the counter without touching the payload ciphertext (with a
  new associated data it would have to re-encrypt, and reusing the nonce is forbidden),
  and a save must re-seal the user's other part the same way (new write id). (A format-1
  payload is re-encrypted when its file is rewritten: its associated data names format 1.)
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import ValidationError

from ..errors import ConfigError, first_error
from ..prefix import PrefixConfig
from .errors import TamperedError, about
from .format import (
    FORMAT_VERSION,
    MAGIC,
    NONCE_BYTES,
    TAG_BYTES,
    FileHeader,
    RawKdf,
    ScryptKdf,
    UserWrite,
    WrappedKey,
    b64,
    canonical_json,
    encode_file,
    unb64,
)

__all__ = ["check_header_mac", "open_payload", "seal"]

_PAYLOAD_FIELDS = (
    "format_version",
    "user_id",
    "base_fingerprint",
    "prefix_config",
    "dtype",
    "key_id",
    "payload_nonce",
    "payload_length",
)


def _payload_aad(fields: dict[str, Any]) -> bytes:
    """Associated data of the payload encryption: magic + the payload-describing fields."""
    return MAGIC + canonical_json({name: fields[name] for name in _PAYLOAD_FIELDS})


def _header_mac(dek: bytes, fields: dict[str, Any]) -> str:
    """HMAC-SHA256 of every other header field under a key derived from the DEK (hex)."""
    # A subkey, so the DEK itself is only ever used as an AES-GCM key.
    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedprefix header mac v1").derive(dek)
    body = {name: value for name, value in fields.items() if name != "header_mac"}
    return hmac.new(mac_key, b"FPX1/header\0" + canonical_json(body), hashlib.sha256).hexdigest()


def seal(
    user_id: str,
    config: PrefixConfig,
    dtype_name: str,
    counter: int,
    key_id: str,
    kdf: ScryptKdf | RawKdf,
    wrapped: WrappedKey,
    dek: bytes,
    write: UserWrite,
    plaintext: bytes | None = None,
    reuse: tuple[bytes, bytes] | None = None,
) -> tuple[FileHeader, bytes]:
    """Encrypt `plaintext` (or keep `reuse` = (nonce, ciphertext) of a file of this format), MAC
    the header, build the file. `write`: the user's parts once this write is done, and its id."""
    if reuse is None:
        assert plaintext is not None
        nonce = os.urandom(NONCE_BYTES)  # fresh for every encryption under this DEK
        length = len(plaintext) + TAG_BYTES
    else:
        nonce, ciphertext = reuse
        length = len(ciphertext)
    fields: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "user_id": user_id,
        "parts": write.parts,
        "write_id": write.write_id,
        "base_fingerprint": config.base_fingerprint,
        "prefix_config": config.model_dump(mode="json"),
        "dtype": dtype_name,
        "key_id": key_id,
        "payload_nonce": b64(nonce),
        "payload_length": length,
        "counter": counter,
        "kdf": kdf.model_dump(mode="json"),
        "wrapped_dek": wrapped.model_dump(mode="json"),
    }
    if reuse is None:
        ciphertext = AESGCM(dek).encrypt(nonce, plaintext, _payload_aad(fields))
    fields["header_mac"] = _header_mac(dek, fields)
    try:
        header = FileHeader.model_validate(fields)
    except ValidationError as exc:  # e.g. an overlong base fingerprint in the prefix's config
        where, message = first_error(exc, "header")
        raise ConfigError(f"prefix of user {user_id!r}: cannot store it ({where}: {message})") from None
    dump = header.fields()
    if dump != fields:  # load recomputes the AAD and the MAC from the parsed header
        raise AssertionError("header does not round-trip")
    return header, encode_file(dump, ciphertext)


def check_header_mac(user_id: str, header: FileHeader, dek: bytes) -> dict[str, Any]:
    """Raise TamperedError unless header_mac matches; returns the header's JSON dump."""
    dump = header.fields()
    if not hmac.compare_digest(_header_mac(dek, dump), header.header_mac):
        raise TamperedError(
            about(user_id, "the key is right but the header fails authentication (tampered or damaged)"), user_id
        )
    return dump


def open_payload(user_id: str, header_dump: dict[str, Any], dek: bytes, ciphertext: bytes) -> bytes:
    """Decrypt and authenticate the payload of a header whose MAC was checked; TamperedError if it fails."""
    try:
        return AESGCM(dek).decrypt(unb64(header_dump["payload_nonce"]), ciphertext, _payload_aad(header_dump))
    except InvalidTag:
        raise TamperedError(
            about(user_id, "the key is right but the prefix data fails authentication (tampered or damaged)"),
            user_id,
        ) from None
