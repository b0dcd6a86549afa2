"""The engine's lean forward: the same logits and KV as transformers' own, for every row."""

from __future__ import annotations

import pytest
import torch
from fedprefix.common.attention import cache_from_layers, cache_layers, stack_prefixes
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams, generate_tokens, left_pad
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.fast_llama import FastLlama, TransformersForward, serving_forward

from tests.conftest import random_prefix

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]


def batch(base, lengths):
    """Left-padded prompts behind prefixes of `lengths` (0: that row has none)."""
    ids, mask = left_pad(PROMPTS, base.tokenizer.pad_token_id)
    rows = [None if n == 0 else random_prefix(base, n, seed=n, scale=3.0).key_values().detach() for n in lengths]
    return ids, mask, stack_prefixes(rows, dtype=base.dtype, device="cpu")


def run(forward, ids, mask, prefixes, steps: int = 3, feed=None):
    """Prefill, then `steps` decode steps (greedy, or fed the tokens of another run's logits `feed`):
    the logits of every step and the final KV."""
    logits, layers = forward.prefill(ids, mask, prefixes)
    cache, full_mask = cache_from_layers(layers), torch.cat([prefixes.mask, mask], dim=1)
    positions = (prefixes.lengths + mask.sum(dim=1)).unsqueeze(1)
    seen = [logits]
    for step in range(steps):
        full_mask = torch.cat([full_mask, torch.ones(len(ids), 1, dtype=full_mask.dtype)], dim=1)
        tokens = (logits if feed is None else feed[step]).argmax(-1, keepdim=True)
        logits = forward.decode_step(tokens, full_mask, positions, cache)
        positions = positions + 1
        seen.append(logits)
    return seen, cache_layers(cache), full_mask


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_logits_and_kv_equal_transformers(name):
    base = load_base(name)
    ids, mask, prefixes = batch(base, [2, 5, 0, 3])  # mixed prefix lengths, one row without
    assert isinstance(serving_forward(base.model), FastLlama)
    with torch.no_grad():
        fast, fast_kv, full_mask = run(FastLlama(base.model), ids, mask, prefixes)
        ref, ref_kv, _ = run(TransformersForward(base.model), ids, mask, prefixes)
    for ours, theirs in zip(fast, ref, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    real = full_mask.bool()[:, None, :, None]  # padding slots hold nothing anyone reads
    for (k, v), (k_ref, v_ref) in zip(fast_kv, ref_kv, strict=True):
        torch.testing.assert_close(k * real, k_ref * real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v * real, v_ref * real, rtol=1e-5, atol=1e-5)


def test_bfloat16_rows_pick_the_same_tokens_as_transformers():
    """In bfloat16 two correct kernels round differently, so near-ties may break either way: fed
    the same tokens, logits agree within bfloat16's precision, and every argmax that the two
    logit vectors' distance cannot flip is the same."""
    base = load_base("tiny-llama").with_dtype(torch.bfloat16)
    ids, mask, prefixes = batch(base, [4, 0, 2, 6])
    with torch.no_grad():
        ref, _, _ = run(TransformersForward(base.model), ids, mask, prefixes, steps=8)
        fast, _, _ = run(FastLlama(base.model), ids, mask, prefixes, steps=8, feed=ref)
    clear = 0
    for ours, theirs in zip(fast, ref, strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.05, atol=0.05)
        top2 = theirs.float().topk(2, dim=-1).values
        apart = (ours.float() - theirs.float()).abs().amax(dim=-1)  # per row
        decided = top2[:, 0] - top2[:, 1] > 2 * apart  # a tie within the disagreement may break either way
        assert torch.equal(ours.argmax(-1)[decided], theirs.argmax(-1)[decided])
        clear += int(decided.sum())
    assert clear >= len(ref) * len(PROMPTS) // 2  # the check is not vacuous


def test_other_architectures_run_through_transformers():
    gpt2 = load_base("tiny-gpt2")
    assert isinstance(serving_forward(gpt2.model), TransformersForward)
    gelu = load_base("tiny-qwen2")
    gelu.model.config.hidden_act = "gelu"
    assert isinstance(serving_forward(gelu.model), TransformersForward)


def test_engine_on_a_base_without_the_lean_forward_equals_the_plain_loop():
    base = load_base("tiny-gpt2")
    params = SamplingParams(max_new_tokens=6)
    with Engine(base) as engine:
        results = engine.generate([GenerationRequest(p, params=params) for p in PROMPTS])
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens == generate_tokens(base.model, base.tokenizer, [prompt], [None], params)[0]
