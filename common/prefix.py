"""Prefix parameters for prefix tuning (Li & Liang, 2021), laid out as PEFT lays them out.

A prefix gives every attention layer P extra key and value vectors, prepended to
the keys and values of the real tokens; the base weights never change.

Two layouts of the same numbers:
- flat, PEFT's ``prompt_embeddings``: (P, 2*L*H*D), column ((l*2 + kv)*H + h)*D + d,
  kv 0 = key, 1 = value;
- kv, what attention consumes: (L, 2, H, P, D).
H is the model's *key/value* head count (grouped-query attention has fewer kv heads
than query heads) and D its head_dim.

Two parameterizations, as in PEFT's PrefixEncoder (same parameter names, so state
dicts are interchangeable):
- direct: ``embedding.weight`` (P, 2*L*H*D) is the prefix itself;
- projected (``prefix_projection``): ``embedding.weight`` (P, H*D) goes through
  Linear(H*D, E) -> Tanh -> Linear(E, 2*L*H*D). It trains more stably and folds
  into a direct prefix once training is done (``Prefix.folded``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt
from torch import nn

from .errors import ConfigError, FingerprintMismatchError, ShapeError, UnsupportedModelError

if TYPE_CHECKING:
    from .base_model import BaseModelHandle

# model_type -> how to read (layers, kv heads, head_dim) from its config. Only
# architectures whose attention we test with a prefix cache are listed.
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2")


class PrefixSpec(BaseModel):
    """Shape of a prefix for one base model: L layers x H kv heads x P tokens x D dims."""

    model_config = ConfigDict(frozen=True)

    num_layers: PositiveInt
    num_kv_heads: PositiveInt  # key/value heads, not query heads (GQA)
    head_dim: PositiveInt
    num_virtual_tokens: PositiveInt  # P, the prefix length

    @classmethod
    def from_model_config(cls, config, num_virtual_tokens: int) -> PrefixSpec:
        """Derive the spec from a transformers config; refuses architectures we do not support."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported for prefix tuning; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        sliding = [kind for kind in getattr(config, "layer_types", None) or () if kind != "full_attention"]
        if sliding:  # e.g. Qwen2 with use_sliding_window
            raise UnsupportedModelError(
                f"this {model_type} base has {len(sliding)} sliding-window attention layers ({sliding[0]}): "
                "tokens further than the window from a prefix cannot see it there, and a batch's padding "
                "moves that limit row by row; only bases with full attention in every layer are supported"
            )
        if num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if model_type == "gpt2":
            layers, heads, kv_heads = config.n_layer, config.n_head, config.n_head
            head_dim = config.n_embd // config.n_head
        else:
            layers, heads = config.num_hidden_layers, config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, num_virtual_tokens=num_virtual_tokens)

    @property
    def token_dim(self) -> int:
        """H*D: one layer's key (or value) width, PEFT's ``token_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def flat_dim(self) -> int:
        """2*L*H*D: one virtual token's width in the flat layout."""
        return 2 * self.num_layers * self.token_dim

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        """(L, 2, H, P, D)."""
        return (self.num_layers, 2, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)


def flat_to_kv(flat: torch.Tensor, spec: PrefixSpec) -> torch.Tensor:
    """(P, 2*L*H*D) -> (L, 2, H, P, D)."""
    expected = (spec.num_virtual_tokens, spec.flat_dim)
    if tuple(flat.shape) != expected:
        raise ShapeError(f"flat prefix has shape {tuple(flat.shape)}, expected {expected} for {spec}")
    tokens, layers, heads, dim = spec.num_virtual_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim
    return flat.view(tokens, layers, 2, heads, dim).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)


def kv_to_flat(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, H, P, D) -> (P, 2*L*H*D)."""
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ShapeError(f"prefix kv must have shape (L, 2, H, P, D), got {tuple(kv.shape)}")
    return kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)


class PrefixConfig(BaseModel):
    """What a prefix is: its spec, its parameterization and the base it belongs to."""

    model_config = ConfigDict(frozen=True)

    spec: PrefixSpec
    prefix_projection: bool = False
    encoder_hidden_size: PositiveInt | None = None  # E of the MLP; None = token_dim, as PEFT
    base_fingerprint: str


class Prefix(nn.Module):
    """Trainable prefix for one base model.

    Example:
        >>> spec = PrefixSpec(num_layers=2, num_kv_heads=2, head_dim=8, num_virtual_tokens=4)
        >>> prefix = Prefix(PrefixConfig(spec=spec, base_fingerprint="f" * 64), init="zero")
        >>> prefix.key_values().shape  # (L, 2, H, P, D)
        torch.Size([2, 2, 2, 4, 8])
    """

    def __init__(
        self,
        config: PrefixConfig,
        init: Literal["random", "zero"] = "random",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        spec = config.spec
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or spec.token_dim
            self.embedding = nn.Embedding(spec.num_virtual_tokens, spec.token_dim)  # (P, H*D)
            self.transform = nn.Sequential(
                nn.Linear(spec.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, spec.flat_dim)
            )
        else:
            self.embedding = nn.Embedding(spec.num_virtual_tokens, spec.flat_dim)  # (P, 2*L*H*D)
            self.transform = None
        # Projected prefixes initialized from text add this fixed (P, 2*L*H*D) offset.
        self.register_buffer("anchor", None)
        self._initialize(init, generator)

    def _initialize(self, init: str, generator: torch.Generator | None) -> None:
        if init not in ("random", "zero"):
            raise ConfigError(f"init must be 'random' or 'zero' here (use Prefix.from_text for 'text'), got {init!r}")
        with torch.no_grad():
            # Same distributions as PEFT's defaults (nn.Embedding N(0,1), nn.Linear
            # Kaiming-uniform), drawn from `generator` so a seed fixes the prefix.
            self.embedding.weight.normal_(0.0, 1.0, generator=generator)
            if self.transform is not None:
                for layer in (self.transform[0], self.transform[2]):
                    bound = 1.0 / layer.in_features**0.5
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)
            if init == "zero":
                last = self.embedding if self.transform is None else self.transform[2]
                for param in last.parameters():
                    param.zero_()

    @property
    def spec(self) -> PrefixSpec:
        return self.config.spec

    @property
    def base_fingerprint(self) -> str:
        return self.config.base_fingerprint

    def flat(self) -> torch.Tensor:
        """The prefix in PEFT's flat layout, (P, 2*L*H*D); differentiable."""
        weight = self.embedding.weight
        if self.transform is None:
            return weight
        out = self.transform(weight)
        return out if self.anchor is None else out + self.anchor

    def key_values(self) -> torch.Tensor:
        """The prefix as attention consumes it, (L, 2, H, P, D); differentiable."""
        return flat_to_kv(self.flat(), self.spec)

    def folded(self) -> Prefix:
        """A direct (MLP-free) copy with identical key/values, detached from autograd."""
        with torch.no_grad():
            return Prefix.from_flat(self.flat().detach().clone(), self.spec, self.base_fingerprint)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that defines this prefix (parameters and anchor), detached."""
        return {name: t.detach() for name, t in self.state_dict().items()}

    @classmethod
    def from_state(cls, config: PrefixConfig, tensors: dict[str, torch.Tensor]) -> Prefix:
        """Rebuild a prefix from `state_tensors()` output; shapes must match `config`."""
        prefix = cls(config, init="zero")
        if "anchor" in tensors:
            prefix.anchor = torch.empty_like(tensors["anchor"])
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) == 1:
            prefix.to(dtypes.pop())
        expected = {name: tuple(t.shape) for name, t in prefix.state_dict().items()}
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != got:
            raise ShapeError(f"prefix tensors {got} do not match {config.spec}: expected {expected}")
        prefix.load_state_dict(tensors, strict=True)
        return prefix

    def num_trainable(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def check_base(self, fingerprint: str) -> None:
        """Raise unless this prefix was made for the base with `fingerprint`."""
        if fingerprint != self.base_fingerprint:
            raise FingerprintMismatchError(
                f"prefix belongs to base {self.base_fingerprint[:12]}…, not to base {fingerprint[:12]}…; "
                "a prefix only works with the exact base model it was trained on"
            )

    @classmethod
    def from_flat(cls, flat: torch.Tensor, spec: PrefixSpec, base_fingerprint: str) -> Prefix:
        """A direct prefix holding `flat` (P, 2*L*H*D)."""
        flat_to_kv(flat, spec)  # validates the shape
        prefix = cls(PrefixConfig(spec=spec, base_fingerprint=base_fingerprint), init="zero")
        prefix.to(flat.dtype)
        with torch.no_grad():
            prefix.embedding.weight.copy_(flat)
        return prefix

    @classmethod
    def from_key_values(cls, kv: torch.Tensor, base_fingerprint: str) -> Prefix:
        """A direct prefix holding `kv` (L, 2, H, P, D)."""
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ShapeError(f"prefix kv must have shape (L, 2, H, P, D), got {tuple(kv.shape)}")
        layers, _, heads, tokens, dim = kv.shape
        spec = PrefixSpec(num_layers=layers, num_kv_heads=heads, head_dim=dim, num_virtual_tokens=tokens)
        return cls.from_flat(kv_to_flat(kv), spec, base_fingerprint)

    @classmethod
    def from_text(
        cls,
        base: BaseModelHandle,
        text: str,
        num_virtual_tokens: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        generator: torch.Generator | None = None,
        skip: int = 0,
    ) -> Prefix:
        """A prefix equal to the base's own keys/values for tokens [skip, skip + P) of `text`.

        `skip` lets a shared part take the first tokens and a personal part the next
        ones, so that [shared ; personal] equals the text's KV as a whole.

        Starting from real activations trains faster and more stably than random
        vectors (Li & Liang 2021, section 7.2). With ``prefix_projection`` the text KV
        becomes a fixed anchor that the MLP's output is added to, and the MLP's last layer
        starts at zero, so the prefix equals the text KV exactly and the MLP can still learn.
        """
        from .attention import text_key_values  # attention is the only module that reads caches

        ids = base.tokenizer(text, return_tensors="pt").input_ids
        needed = skip + num_virtual_tokens
        if ids.shape[1] < needed:
            raise ConfigError(
                f"init text has {ids.shape[1]} tokens but the prefix needs {needed}; "
                "give a longer text or a shorter prefix"
            )
        kv = text_key_values(base.model, ids[:, :needed].to(base.device))[:, :, :, skip:]  # (L, 2, H, P, D)
        spec = base.prefix_spec(num_virtual_tokens)
        config = PrefixConfig(
            spec=spec,
            prefix_projection=prefix_projection,
            encoder_hidden_size=encoder_hidden_size,
            base_fingerprint=base.fingerprint,
        )
        prefix = cls(config, init="random", generator=generator)
        with torch.no_grad():
            flat = kv_to_flat(kv).to(prefix.embedding.weight)  # the prefix's dtype and device (CPU), not the base's
            if prefix.transform is None:
                prefix.embedding.weight.copy_(flat)
            else:
                # The MLP's bias is shared by all P tokens and cannot hold P different
                # rows, so the text KV becomes a fixed anchor the MLP output is added to;
                # a zero last layer makes the start exactly the text KV.
                prefix.transform[2].weight.zero_()
                prefix.transform[2].bias.zero_()
                prefix.anchor = flat.clone()
        return prefix


def concat_key_values(*parts: torch.Tensor) -> torch.Tensor:
    """Join prefixes along the token axis: shared part first, then personal; (L, 2, H, sum P, D)."""
    if not parts:
        raise ShapeError("concat_key_values needs at least one prefix")
    head = parts[0].shape
    for part in parts[1:]:
        if part.shape[:3] != head[:3] or part.shape[4] != head[4]:
            raise ShapeError(f"cannot join prefixes of shapes {tuple(head)} and {tuple(part.shape)}")
    return torch.cat(parts, dim=3)
