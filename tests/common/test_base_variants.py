"""Bases shaped unlike the tiny test models, as real ones are: the lean training and serving
forwards and the PEFT export agree with transformers for each (tied embeddings, Llama 3's
rope scaling, biases, a head_dim not hidden / heads, one or all key/value heads); sliding-window
layers are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fedprefix.client.data import Example
from fedprefix.client.training import completion_loss, transformers_completion_loss
from fedprefix.common.attention import cache_from_layers, stack_prefixes
from fedprefix.common.base_model import BaseModelHandle, byte_tokenizer, fingerprint_state, load_base, tiny_config
from fedprefix.common.errors import UnsupportedModelError
from fedprefix.common.generation import left_pad
from fedprefix.common.peft_format import export_peft
from fedprefix.common.train_forward import unsupported_reason
from fedprefix.coordinator.serving.fast_llama import FastLlama, TransformersForward

from tests.conftest import random_prefix

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6}
VARIANTS = {
    "llama-3.2-like": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama-biases-mqa-head-dim-24": (
        "llama",
        dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1, head_dim=24, rms_norm_eps=1e-2),
    ),
    "qwen2.5-like": ("qwen2", dict(tie_word_embeddings=True, rope_parameters=QWEN_ROPE)),
    "qwen2-no-gqa-head-dim-8": ("qwen2", dict(num_key_value_heads=4, head_dim=8)),
}


def variant_base(name: str) -> BaseModelHandle:
    """A random tiny base of that variant, its biases and norm weights away from their 0 / 1 init
    (where they would hide a bias or norm left out)."""
    model_type, changes = VARIANTS[name]
    config = tiny_config(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    config.pad_token_id = 259
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        with torch.no_grad():
            for key, weight in model.named_parameters():
                if weight.dim() == 1:
                    weight.copy_(("norm" in key) + 0.2 * torch.randn_like(weight))
    model.eval().requires_grad_(False)
    return BaseModelHandle(name, model, byte_tokenizer(), fingerprint_state(model.config, model.state_dict()))


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return variant_base(request.param)


def test_the_lean_training_forward_equals_transformers(variant):
    assert unsupported_reason(variant.model) is None
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(3, 250, (n,), generator=generator).tolist()

    head = tokens(6)  # a head every row shares, as a chat template's system prompt
    batch = [Example(head + tokens(p), tokens(c), row) for row, (p, c) in enumerate([(3, 4), (7, 2), (1, 5)])]
    start = random_prefix(variant, 3, seed=2).key_values().detach()
    seen = []
    for loss_of in (completion_loss, transformers_completion_loss):
        kv = start.clone().requires_grad_(True)
        loss, _ = loss_of(variant, kv, batch)
        loss.backward()
        seen.append((loss.detach(), kv.grad))
    (lean, lean_grad), (plain, plain_grad) = seen
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_the_serving_forward_equals_transformers(variant):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, mask = left_pad(prompts, variant.tokenizer.pad_token_id)
    rows = [random_prefix(variant, n, seed=n, scale=3.0).key_values().detach() for n in (2, 5, 3)]
    prefixes = stack_prefixes(rows, dtype=variant.dtype, device="cpu")

    def logits_of(forward, feed=None):
        logits, layers = forward.prefill(ids, mask, prefixes)
        cache, full_mask = cache_from_layers(layers), torch.cat([prefixes.mask, mask], dim=1)
        positions = (prefixes.lengths + mask.sum(dim=1)).unsqueeze(1)
        seen = [logits]
        for step in range(2):
            full_mask = torch.cat([full_mask, torch.ones(len(ids), 1, dtype=full_mask.dtype)], dim=1)
            tokens = (logits if feed is None else feed[step]).argmax(-1, keepdim=True)
            logits = forward.decode_step(tokens, full_mask, positions, cache)
            positions = positions + 1
            seen.append(logits)
        return seen

    with torch.no_grad():
        plain = logits_of(TransformersForward(variant.model))
        lean = logits_of(FastLlama(variant.model), feed=plain)
    for ours, theirs in zip(lean, plain, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_peft_export_gives_peft_our_logits(variant, tmp_path):
    peft = pytest.importorskip("peft")
    from fedprefix.common.attention import forward_with_prefixes

    ids = torch.tensor([[5, 17, 99, 120, 33, 7]])
    prefix = random_prefix(variant, 5, seed=11)
    export_peft(prefix, tmp_path, base_model_name_or_path=variant.name)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(variant.model), tmp_path)
    batch = stack_prefixes([prefix.key_values().detach()], variant.dtype, "cpu")
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
        ours = forward_with_prefixes(variant.model, ids, torch.ones_like(ids), batch).logits
    assert (theirs - ours).abs().max() < 1e-5


def test_a_base_with_sliding_window_layers_is_refused(tmp_path):
    """In a sliding layer a token further than the window from the prefix cannot see it, and the
    batch layout's padding moved that limit per row: a short row batched beside a long one got
    other logits (up to 5.3 apart) and other Engine tokens than alone, and from_text lost keys."""
    from transformers import AutoModelForCausalLM

    settings = tiny_config("qwen2").to_dict()
    del settings["layer_types"]  # made again from the window settings
    settings.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    config = type(tiny_config("qwen2"))(**settings)
    assert "sliding_attention" in config.layer_types
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="1 sliding-window attention layers"):
        load_base(tmp_path)
    full = json.loads((tmp_path / "config.json").read_text())
    full["layer_types"] = ["full_attention"] * 2  # the same window flag, every layer full: runs
    (tmp_path / "config.json").write_text(json.dumps(full))
    assert load_base(tmp_path).prefix_spec(4).num_layers == 2
