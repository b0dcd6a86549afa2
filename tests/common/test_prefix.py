"""PrefixSpec, parameterizations, inits and their errors."""

from __future__ import annotations

import pytest
import torch
from fedprefix.common.attention import forward_with_prefixes, stack_prefixes
from fedprefix.common.errors import ConfigError, FingerprintMismatchError, ShapeError, UnsupportedModelError
from fedprefix.common.generation import left_pad
from fedprefix.common.prefix import Prefix, PrefixConfig, PrefixSpec, flat_to_kv, kv_to_flat
from transformers import AutoConfig

from tests.conftest import random_prefix


def test_spec_uses_kv_heads_and_head_dim():
    llama = AutoConfig.for_model(
        "llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576
    )
    spec = PrefixSpec.from_model_config(llama, 16)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    assert spec.flat_dim == 2 * 30 * 3 * 64
    gpt2 = AutoConfig.for_model("gpt2", n_layer=3, n_head=4, n_embd=32)
    assert PrefixSpec.from_model_config(gpt2, 2).kv_shape == (3, 2, 4, 2, 8)


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(UnsupportedModelError, match="supported: gpt2, llama, qwen2"):
        PrefixSpec.from_model_config(AutoConfig.for_model("bert"), 4)


def test_flat_layout_matches_peft_column_order():
    spec = PrefixSpec(num_layers=3, num_kv_heads=2, head_dim=4, num_virtual_tokens=5)
    flat = torch.arange(5 * spec.flat_dim, dtype=torch.float32).view(5, spec.flat_dim)
    kv = flat_to_kv(flat, spec)
    layer, which, head, token, d = 2, 1, 1, 3, 2
    assert kv[layer, which, head, token, d] == flat[token, ((layer * 2 + which) * 2 + head) * 4 + d]
    assert torch.equal(kv_to_flat(kv), flat)


def test_wrong_shapes_are_refused():
    spec = PrefixSpec(num_layers=2, num_kv_heads=2, head_dim=4, num_virtual_tokens=3)
    with pytest.raises(ShapeError, match=r"expected \(3, 32\)"):
        flat_to_kv(torch.zeros(3, 31), spec)
    with pytest.raises(ShapeError, match="batch prefixes"):
        stack_prefixes([torch.zeros(2, 2, 2, 3, 4), torch.zeros(2, 2, 3, 3, 4)], torch.float32, "cpu")


def test_projection_folds_into_identical_direct_prefix(tiny_base):
    prefix = random_prefix(tiny_base, 6, seed=1, projection=True)
    folded = prefix.folded()
    assert folded.transform is None and prefix.transform is not None
    assert folded.num_trainable() == 6 * prefix.spec.flat_dim < prefix.num_trainable()
    assert torch.equal(folded.key_values(), prefix.key_values().detach())


def test_zero_init_gives_zero_key_values(tiny_base):
    config = PrefixConfig(spec=tiny_base.prefix_spec(4), prefix_projection=True, base_fingerprint=tiny_base.fingerprint)
    assert Prefix(config, init="zero").key_values().abs().max() == 0


def test_seeded_random_init_is_reproducible(tiny_base):
    a = random_prefix(tiny_base, 4, seed=3, projection=True)
    b = random_prefix(tiny_base, 4, seed=3, projection=True)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("projection", [False, True])
def test_init_from_text_reproduces_the_base_kv(tiny_base, projection):
    text = "The quick brown fox jumps over the lazy dog"
    tokens = 6
    prefix = Prefix.from_text(tiny_base, text, tokens, prefix_projection=projection)
    ids = tiny_base.tokenizer(text).input_ids
    continuation = ids[tokens:]
    with torch.no_grad():
        full = tiny_base.model(input_ids=torch.tensor([ids])).logits[0, tokens:]
    ids_t, mask = left_pad([continuation], tiny_base.tokenizer.pad_token_id)
    batch = stack_prefixes([prefix.key_values().detach()], tiny_base.dtype, "cpu")
    with torch.no_grad():
        ours = forward_with_prefixes(tiny_base.model, ids_t, mask, batch).logits[0]
    assert (ours - full).abs().max() < 1e-5


def test_init_from_short_text_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="init text has 2 tokens but the prefix needs 8"):
        Prefix.from_text(tiny_llama, "hi", 8)


def test_prefix_from_other_base_is_refused(tiny_llama):
    prefix = random_prefix(tiny_llama, 2)
    prefix.check_base(tiny_llama.fingerprint)
    with pytest.raises(FingerprintMismatchError, match="exact base model"):
        prefix.check_base("0" * 64)


def test_state_round_trip_keeps_anchor(tiny_llama):
    prefix = Prefix.from_text(tiny_llama, "some text long enough to init", 4, prefix_projection=True)
    again = Prefix.from_state(prefix.config, prefix.state_tensors())
    assert torch.equal(again.key_values(), prefix.key_values())
    bad = dict(prefix.state_tensors(), **{"embedding.weight": torch.zeros(3, 3)})
    with pytest.raises(ShapeError, match="do not match"):
        Prefix.from_state(prefix.config, bad)


def test_left_pad_refuses_empty_prompt():
    with pytest.raises(ConfigError, match="at least one token"):
        left_pad([[1, 2], []], 0)
