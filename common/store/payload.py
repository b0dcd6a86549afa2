"""What the ciphertext holds: a prefix's tensors as safetensors, and the prefix rebuilt from them.

Payload plaintext = ``safetensors.torch.save(prefix.state_tensors())`` in the storage
dtype the header names (float32, float16 or bfloat16). The tensors and their shapes
follow from the header's ``prefix_config`` (common/prefix.py): ``embedding.weight``
(P, 2*L*H*D) for a direct prefix; (P, H*D) plus the MLP's ``transform.*`` weights for a
projected one; and ``anchor`` (P, 2*L*H*D) where a projected prefix has one.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..errors import ConfigError, ShapeError
from ..precision import DTYPE_BY_NAME
from ..prefix import Prefix, PrefixConfig
from .errors import CorruptError, NonFiniteError, about

__all__ = ["check_load_dtype", "decode_payload", "encode_payload", "storage_dtype_name"]

_DTYPES: dict[str, torch.dtype] = {name: DTYPE_BY_NAME[name] for name in ("float32", "float16", "bfloat16")}  # stored
_LOAD_DTYPES = (*_DTYPES.values(), torch.float64)


def storage_dtype_name(dtype: torch.dtype) -> str:
    """The header's name of a storage dtype; ConfigError for any other dtype."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"storage dtype must be one of torch.float32, torch.float16, torch.bfloat16; got {dtype}")


def check_load_dtype(dtype: torch.dtype | None) -> None:
    """Refuse a dtype a loaded prefix cannot be returned in (None: as stored)."""
    if dtype is not None and dtype not in _LOAD_DTYPES:
        raise ConfigError(f"load dtype must be float32, float16, bfloat16, float64 or None; got {dtype}")


def encode_payload(prefix: Prefix, dtype_name: str, user_id: str | None = None) -> bytes:
    """The payload plaintext of `prefix`: its state tensors on the CPU in dtype `dtype_name`.

    NonFiniteError if any value is NaN or Inf in that dtype (also one too large for float16).
    """
    if not isinstance(prefix, Prefix):
        raise ConfigError(f"save expects a Prefix, got {type(prefix).__name__}")
    tensors = {
        name: t.detach().to(device="cpu", dtype=_DTYPES[dtype_name]).contiguous()
        for name, t in prefix.state_tensors().items()
    }
    for name, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteError(
                about(user_id, f"tensor {name!r} holds {bad} NaN or Inf values as {dtype_name}; nothing was saved"),
                user_id,
            )
    return safetensors_save(tensors)


def decode_payload(
    user_id: str, plaintext: bytes, config: PrefixConfig, dtype_name: str, dtype: torch.dtype | None
) -> Prefix:
    """The prefix in an authenticated payload, in `dtype` (None: as stored); CorruptError if it does not fit."""
    stored = _DTYPES[dtype_name]
    try:
        tensors = safetensors_load(plaintext)
        if any(t.dtype != stored for t in tensors.values()):
            raise ShapeError(f"tensors are not all {dtype_name}")
        if dtype is not None:
            tensors = {name: t.to(dtype) for name, t in tensors.items()}
        return Prefix.from_state(config, tensors)
    except (SafetensorError, ShapeError, RuntimeError, ValueError, KeyError) as exc:
        # Authenticated, so written by this code with the key: a bug or a format clash.
        raise CorruptError(about(user_id, f"stored tensors do not form the prefix ({exc})"), user_id) from None
