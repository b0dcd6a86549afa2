"""Export prefixes to, and import them from, PEFT's adapter folder format.

A PEFT prefix-tuning adapter folder holds
- ``adapter_config.json``: a PrefixTuningConfig (all fields, as PEFT 0.21 writes them);
- ``adapter_model.safetensors``: ``prompt_embeddings`` (P, 2*L*H*D) in PEFT's flat layout
  (see fedprefix.common.prefix), H the kv heads.
Projected prefixes are folded into plain key/values on export, so the folder loads
with ``PeftModel.from_pretrained`` whatever the parameterization was. We add
``fedprefix.json`` with the base fingerprint; PEFT ignores it, import checks it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .base_model import BaseModelHandle
from .errors import ConfigError, ShapeError
from .files import atomic_write_bytes, left_temp_folders
from .prefix import Prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FEDPREFIX_META = "fedprefix.json"
ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, FEDPREFIX_META}
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose format this writes and is tested against


STAGING_MARK = "fedprefix-export-"  # in the name of an export's staging folder, beside the target
PREVIOUS = ".previous"  # the earlier export set aside while the new one is renamed in: staging name + this


def export_peft(prefix: Prefix, folder: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write `prefix` as a PEFT adapter folder; returns the folder.

    All or nothing: the files are written into a new folder beside it that then takes its
    place, so a failure (a full disk) leaves the folder as it was. ConfigError, before anything
    is written, for a prefix holding NaN or Inf, an empty path, a file, or a folder holding
    anything but a previous export (its files would sit beside the adapter)."""
    if os.fspath(folder) == "":
        raise ConfigError("export folder: give a folder path, not an empty string")
    folder = Path(folder)
    target = folder.resolve()
    spec = prefix.spec
    flat = prefix.folded().flat().detach().to(torch.float32).contiguous()  # (P, 2*L*H*D)
    if not bool(torch.isfinite(flat).all()):
        raise ConfigError("the prefix holds NaN or Inf; nothing was exported")
    if target == Path.cwd().resolve():  # it is moved aside and replaced: not the folder a process runs in
        raise ConfigError(f"export folder {folder} is the current folder: give a folder inside it")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"export folder {folder} is a file")
    above = next((p for p in target.parents if p.exists()), None)
    if above is not None and not above.is_dir():  # mkdir would say only "File exists"
        raise ConfigError(f"export folder {folder}: {above} is a file, not a folder")
    if target.is_dir() and (foreign := sorted(p.name for p in target.iterdir() if p.name not in ADAPTER_FILES)):
        raise ConfigError(f"export folder {folder} holds {foreign[0]}, not only an adapter: give a new or empty folder")
    config = {
        "task_type": "CAUSAL_LM",
        "peft_type": "PREFIX_TUNING",
        "auto_mapping": None,
        "peft_version": PEFT_FORMAT_VERSION,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "token_dim": spec.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": spec.num_kv_heads,  # PEFT stores kv heads here for GQA models
        "num_layers": spec.num_layers,
        "modules_to_save": None,
        "init_weights": None,
        "encoder_hidden_size": spec.token_dim,
        "prefix_projection": False,  # folded on export
    }
    meta = {"base_fingerprint": prefix.base_fingerprint, "spec": spec.model_dump()}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_left_copies(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{STAGING_MARK}", dir=target.parent))
    except OSError as exc:
        raise _unwritable(folder, exc) from None
    try:
        atomic_write_bytes(staging / ADAPTER_WEIGHTS, save({"prompt_embeddings": flat}))
        atomic_write_bytes(staging / FEDPREFIX_META, json.dumps(meta, indent=2).encode())
        atomic_write_bytes(staging / ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
        if target.exists():  # empty, or a previous export: moved aside, then removed
            previous = staging.with_name(staging.name + PREVIOUS)
            os.replace(target, previous)
            try:
                os.replace(staging, target)
            except BaseException:
                with contextlib.suppress(OSError):  # the earlier export stays where it was (else: set aside)
                    os.replace(previous, target)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno is not None:  # a full disk, say
            raise _unwritable(folder, exc) from exc
        raise
    return folder


def _unwritable(folder: Path, exc: OSError) -> OSError:
    """`exc` named by the export folder asked for, not by the temp folder beside it."""
    return OSError(exc.errno, f"export folder {folder} cannot be written: {exc.strerror}")


def _remove_left_copies(target: Path) -> None:
    """Remove what an export into `target` killed midway left beside it: its staging folder
    (``.<name>.fedprefix-export-XXXXXXXX``: mkdtemp's 8 characters after a mark no other folder
    has) and a previous export set aside (the same + ``.previous``); each holds a prefix in plain
    text, which no later export had removed."""
    mark = f".{target.name}.{STAGING_MARK}"
    left = left_temp_folders(target.parent, mark, ("", PREVIOUS))
    set_aside = [path for path in left if path.name.endswith(PREVIOUS)]
    if set_aside and not os.path.lexists(target):  # killed between its two renames: the earlier export
        newest = max(set_aside, key=lambda path: path.stat().st_mtime_ns)
        os.replace(newest, target)
        left.remove(newest)
    for path in left:
        shutil.rmtree(path, ignore_errors=True)


def import_peft(folder: str | os.PathLike, base: BaseModelHandle) -> Prefix:
    """Read a PEFT prefix-tuning adapter folder as a (direct) prefix for `base`."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"{path} is missing; not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid JSON: {exc}") from exc
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ConfigError(f"{config_path}: peft_type is {config.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise ConfigError(f"{config_path}: encoder-decoder adapters are not supported")
    spec = base.prefix_spec(int(config["num_virtual_tokens"]))
    for field, expected in (
        ("num_layers", spec.num_layers),
        ("num_attention_heads", spec.num_kv_heads),
        ("token_dim", spec.token_dim),
    ):
        if config.get(field) is not None and config[field] != expected:
            raise ShapeError(f"{config_path}: {field} is {config[field]}, but base {base.name} needs {expected}")
    meta_path = folder / FEDPREFIX_META
    fingerprint = base.fingerprint
    if meta_path.is_file():
        fingerprint = json.loads(meta_path.read_text()).get("base_fingerprint", fingerprint)
    tensors = load_file(weights_path)
    if "prompt_embeddings" not in tensors:
        raise ConfigError(f"{weights_path} has no 'prompt_embeddings' tensor (found: {sorted(tensors)})")
    prefix = Prefix.from_flat(tensors["prompt_embeddings"].to(torch.float32), spec, fingerprint)
    prefix.check_base(base.fingerprint)
    return prefix
