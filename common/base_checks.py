"""What a run can learn of a base before it loads the weights: that it loads, that a run's rows
fit its context, and its size (which decides how many copies of it fit in memory)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from .base_model import build_tiny, config_context, resolve_folder, tiny_config
from .base_registry import REGISTRY
from .errors import ConfigError
from .prefix import PrefixSpec

log = logging.getLogger(__name__)


def check_base(name_or_path: str | os.PathLike, positions: int = 0) -> None:
    """ConfigError where `load_base` could not find this base, or where `positions` (a run's
    prefix and max_length) pass its context: before a run starts processes that would each fail
    on it (a registry base is fetched and converted here, once)."""
    name = str(name_or_path)
    if name in REGISTRY and REGISTRY[name].builtin:
        config = tiny_config(name.removeprefix("tiny-"))
    else:
        folder = resolve_folder(name)
        try:  # its config and tokenizer, as each node would read them (a second or so, no weights)
            config = AutoConfig.from_pretrained(folder)
            AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # transformers raises many types for a folder it cannot read
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"base model folder {folder} cannot be loaded: {reason}") from exc
        PrefixSpec.from_model_config(config, 1)  # an architecture prefixes do not support
    context = config_context(config)
    if context is not None and positions > context:
        raise ConfigError(
            f"the prefix and max-length take {positions} positions, past base {name}'s context of {context} "
            "tokens: lower max-length or the prefix lengths"
        )


def parameter_count(name_or_path: str | os.PathLike) -> int:
    """A base's parameters, without loading its weights: from the headers of the weight files
    load_base reads (`*.safetensors`, else `pytorch_model*.bin`, memory-mapped); a file that
    cannot be read counts its bytes / 2 (as if bfloat16: an estimate on the high side)."""
    name = str(name_or_path)
    if name in REGISTRY and REGISTRY[name].builtin:
        return sum(p.numel() for p in build_tiny(name.removeprefix("tiny-"))[0].parameters())
    folder = resolve_folder(name)
    count = 0
    for path in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin")):
        try:
            count += _stored_elements(path)
        except Exception:  # a damaged header or file (many types); its size says about as much
            log.debug("could not read the tensors of %s", path, exc_info=True)
            count += path.stat().st_size // 2 if path.is_file() else 0
    return count


def _stored_elements(path: Path) -> int:
    """Elements of the tensors in one weight file, read from its header (safetensors) or index (.bin)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as tensors:
            return sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
