"""Load the frozen base model: registry names (base_registry.py), local folders, hub ids; fingerprint it.

- ``tiny-gpt2``, ``tiny-llama`` (grouped-query attention), ``tiny-qwen2``: random
  tiny models built in-process from a seed, with an offline byte-level tokenizer,
  for tests and quick runs.

Every base gets a fingerprint, a SHA-256 over its config and weights, that every
prefix records: a prefix only works with the exact base it was trained on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .base_registry import REGISTRY, cache_dir, fetch
from .config import DEFAULT_BASE
from .errors import ConfigError
from .prefix import PrefixSpec
from .resources import fit_torch_threads

log = logging.getLogger(__name__)

# ChatML, the format SmolLM2 and Qwen2 use; the tiny models get it too so chat
# data works the same on every base.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_COPYING = threading.Lock()


@dataclass
class BaseModelHandle:
    """A loaded, frozen base model with its tokenizer and fingerprint."""

    name: str  # registry name, folder or hub id it was loaded from
    model: torch.nn.Module = field(repr=False)  # a transformers causal LM in eval mode, requires_grad False
    tokenizer: PreTrainedTokenizerFast = field(repr=False)
    fingerprint: str  # sha256 hex over config + weights
    _copies: dict = field(default_factory=dict, repr=False, compare=False)

    def with_dtype(self, dtype: torch.dtype) -> BaseModelHandle:
        """The same base with weights in `dtype` (a copy, made once and kept for later fits until
        drop_copies(); self if already). Handles may be shared by fits in several threads."""
        if dtype == self.dtype:
            return self
        with _COPYING:  # two first fits at once made two copies
            if dtype not in self._copies:
                model = copy.deepcopy(self.model).to(dtype)
                self._copies[dtype] = BaseModelHandle(self.name, model, self.tokenizer, self.fingerprint)
            return self._copies[dtype]

    def drop_copies(self) -> None:
        """Frees the copies with_dtype kept (a bfloat16 fit's: half the base's size)."""
        with _COPYING:
            self._copies.clear()

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
    # torch.manual_seed would also reseed every GPU's generator, which fork_rng(devices=[])
    # does not put back; the weights are drawn on the CPU.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model, byte_tokenizer()


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
    from .precision import resolve_device, resolve_dtype  # one rule for dtype and device names

    if not isinstance(name_or_path, (str, os.PathLike)):  # a loaded model's str() became a "path"
        raise ConfigError(
            f"a base is a registry name, a folder or a hub id, not a {type(name_or_path).__name__}: "
            "save a loaded model with model.save_pretrained(folder) and tokenizer.save_pretrained(folder), "
            "then pass the folder"
        )
    fit_torch_threads()  # before any compute: a container's CPU quota, which torch does not read
    # "mps" refused as the CLI refuses it: nothing here is tested there
    device = resolve_device("cpu" if device is None else str(device))
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    if name in REGISTRY and REGISTRY[name].builtin:
        model, tokenizer = build_tiny(name.removeprefix("tiny-"), seed=seed)
        fingerprint = fingerprint_state(model.config, model.state_dict())
        label = name if seed == 0 else f"{name}@seed{seed}"
    else:
        folder = resolve_folder(name)
        remedy = f": delete it and run fedprefix base fetch {name}" if name in REGISTRY else ""
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model, loading = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
            )
        except Exception as exc:  # transformers and safetensors raise many types for a folder they cannot read
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"base model folder {folder} cannot be loaded ({reason}){remedy}") from exc
        if mismatch := _weights_unlike_config(loading, model.config.num_hidden_layers):  # GPT-2's n_layer too
            problem = f"its weights do not match its config.json ({mismatch})"
            raise ConfigError(f"base model folder {folder}: {problem}{remedy}")
        fingerprint = _folder_fingerprint(folder)
        label = name
    PrefixSpec.from_model_config(model.config, 1)  # refuse unsupported architectures early
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return BaseModelHandle(name=label, model=model, tokenizer=tokenizer, fingerprint=fingerprint)


def _weights_unlike_config(loading: dict, layers: int) -> str | None:
    """What transformers' loading info says differs between the weight files and the model the
    config builds: weights it would start at random (an edited config with more layers) or
    layers it would leave unread (one with fewer). transformers only prints a report and goes on
    with a wrong model. Other unread entries (old buffers such as GPT-2's attn.masked_bias) are
    only logged."""
    missing = sorted(loading.get("missing_keys") or ())
    unexpected = sorted(loading.get("unexpected_keys") or ())
    unplaced = [key for key in unexpected if (n := _layer_index(key)) is not None and n >= layers]
    if leftovers := [key for key in unexpected if key not in unplaced]:
        log.warning(
            "the base's files hold %d entries its model does not read, such as %s", len(leftovers), leftovers[0]
        )
    parts = [
        f"{len(keys)} {what}, such as {keys[0]}"
        for keys, what in (
            (missing, "weights missing from its files"),
            (unplaced, "weights of layers it does not have"),
        )
        if keys
    ]
    return "; ".join(parts) or None


def _layer_index(key: str) -> int | None:
    """The decoder layer a weight's name places it in ("model.layers.3.mlp..." -> 3; GPT-2's "h.3.")."""
    match = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", key)
    return int(match.group(1)) if match else None


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
    return None
