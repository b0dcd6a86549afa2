"""Decode steps at fixed shapes (what CUDA graphs replay on a GPU), run here without a graph:
the same logits and cache as the eager step, rows padded to a bucket, across a growing buffer."""

from __future__ import annotations

import logging

import pytest
import torch
from fedprefix.common.attention import batch_cache, cache_layers, stack_prefixes
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams, left_pad
from fedprefix.coordinator.serving import Engine, GenerationRequest, cuda_graphs
from fedprefix.coordinator.serving.cuda_graphs import GraphedDecode, bucket_for
from fedprefix.coordinator.serving.fast_llama import FastLlama

from tests.conftest import random_prefix

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def decode_run(forward, base, steps: int):
    """Prefill 3 rows behind prefixes of different lengths into a cache with room for 8 rows and
    2 more slots (it grows on the third step), then `steps` greedy decode steps."""
    device = base.device
    ids, mask = (t.to(device) for t in left_pad(PROMPTS, base.tokenizer.pad_token_id))
    rows = [random_prefix(base, n, seed=n, scale=3.0).key_values().detach() for n in (2, 5, 3)]
    prefixes = stack_prefixes(rows, dtype=base.dtype, device=device)
    logits, layers = forward.prefill(ids, mask, prefixes)
    full_mask = torch.cat([prefixes.mask, mask], dim=1)
    cache, full_mask = batch_cache([(layers, full_mask, None)], headroom=2, row_capacity=8)
    for layer in cache.layers:  # slots and rows never written: what fresh GPU memory may hold
        for buffer in (layer._keys, layer._values):
            buffer[layer.rows :] = float("nan")
            buffer[:, :, layer.length :] = float("nan")
    positions = (prefixes.lengths + mask.sum(dim=1)).unsqueeze(1)
    seen = [logits]
    for _ in range(steps):
        full_mask = torch.cat([full_mask, torch.ones(len(PROMPTS), 1, dtype=full_mask.dtype, device=device)], dim=1)
        logits = forward.decode_step(logits.argmax(-1, keepdim=True), full_mask, positions, cache)
        positions = positions + 1
        seen.append(logits)
    return seen, cache, full_mask


def test_buckets_are_powers_of_two_within_the_row_capacity():
    assert [bucket_for(n, 64) for n in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_for(5, 6) == 6


def test_fixed_shape_steps_equal_the_eager_steps():
    base = load_base("tiny-llama")
    with torch.no_grad():
        eager, eager_cache, full_mask = decode_run(FastLlama(base.model), base, steps=6)
        graphed = GraphedDecode(FastLlama(base.model), capture=False)
        fixed, fixed_cache, _ = decode_run(graphed, base, steps=6)
    for ours, theirs in zip(fixed, eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert fixed_cache.layers[0].slot_capacity > full_mask.shape[1] - 6 + 2  # the buffer grew on the way
    real = full_mask.bool()[:, None, :, None]
    for (k, v), (k_ref, v_ref) in zip(cache_layers(fixed_cache), cache_layers(eager_cache), strict=True):
        assert k.shape == k_ref.shape
        torch.testing.assert_close(k * real, k_ref * real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v * real, v_ref * real, rtol=1e-5, atol=1e-5)
    assert set(graphed._steps) == {4}  # 3 rows padded to one bucket, kept across steps of the same buffers


def test_engine_tokens_equal_with_fixed_shape_decode_steps():
    """Rows joining (4 slots, 7 requests; 3 rows run padded to 4) and leaving (different lengths)
    between fixed-shape steps."""
    base = load_base("tiny-llama")
    prompts = ["Hello there", "A longer prompt than the others, by some way", "Hi", "Tell me", "Why?", "Go", "Ok"]
    requests = [
        GenerationRequest(p, params=SamplingParams(max_new_tokens=3 + 4 * i, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    eager = Engine(base, max_batch_size=4).generate(requests)
    engine = Engine(base, max_batch_size=4)
    engine._batch.forward = graphed = GraphedDecode(engine._forward, capture=False)
    step, stale = graphed.step, []

    def watched_step(chunk, decode):  # the graphs never keep the buffers of a cache the batch dropped
        result = step(chunk, decode)
        if decode is not None and graphed._buffers not in (None, cuda_graphs._buffers_of(decode.cache.layers)):
            stale.append(chunk is not None)
        return result

    graphed.step = watched_step
    fixed = engine.generate(requests)
    assert [r.tokens for r in fixed] == [r.tokens for r in eager]
    assert graphed.padded_steps > 0  # steps with padding rows did run
    assert not stale


def eager_after_capture(monkeypatch, caplog, capture) -> GraphedDecode:
    """Decode steps with `capture` in place of _FixedStep._capture, as on a GPU: the logits must
    still equal the eager steps', with a warning. -> the GraphedDecode, for its reason."""
    base = load_base("tiny-llama")
    with torch.no_grad():
        eager, _, _ = decode_run(FastLlama(base.model), base, steps=3)
        graphed = GraphedDecode(FastLlama(base.model), capture=False)
        graphed.capture = True  # what runs on a GPU, with the capture itself replaced
        monkeypatch.setattr(cuda_graphs._FixedStep, "_capture", capture)
        with caplog.at_level(logging.WARNING):
            fixed, _, _ = decode_run(graphed, base, steps=3)
    for ours, theirs in zip(fixed, eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert "decode steps run eagerly" in caplog.text and not graphed._steps
    return graphed


def test_a_failed_capture_leaves_decode_steps_eager(monkeypatch, caplog):
    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    assert "not permitted" in eager_after_capture(monkeypatch, caplog, refuse).eager_reason


def test_a_graph_that_disagrees_with_its_eager_step_is_not_used(monkeypatch, caplog):
    """A first replay that reads the wrong memory shows as logits unlike the eager step's."""

    class WrongGraph:
        def __init__(self, step):
            self.step = step

        def replay(self):
            self.step.logits.normal_()  # what a replay of stale addresses might leave

    def capture(self):
        eager = self._step()
        self.logits, self.graph = torch.zeros_like(eager), WrongGraph(self)
        return eager

    assert "disagreed" in eager_after_capture(monkeypatch, caplog, capture).eager_reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graph_replays_equal_eager_steps_on_a_gpu():
    base = load_base("tiny-llama", device="cuda")
    with torch.no_grad():
        eager, _, _ = decode_run(FastLlama(base.model), base, steps=6)
        graphed = GraphedDecode(FastLlama(base.model))
        fixed, _, _ = decode_run(graphed, base, steps=6)
    assert graphed.eager_reason is None and all(step.graph is not None for step in graphed._steps.values())
    for ours, theirs in zip(fixed, eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
