"""Prefix injection: equal to PEFT, row-independent in mixed batches, base frozen."""

from __future__ import annotations

import pytest
import torch
from fedprefix.common.attention import forward_with_prefixes, stack_prefixes
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams, generate_tokens, left_pad
from fedprefix.common.prefix import Prefix, concat_key_values

from tests.conftest import random_prefix

peft = pytest.importorskip("peft")


def _ids(base, texts):
    return [base.tokenizer(t).input_ids for t in texts]


def _logits(base, rows, prefixes):
    ids, mask = left_pad(rows, base.tokenizer.pad_token_id)
    batch = stack_prefixes(prefixes, dtype=base.dtype, device=base.device)
    return forward_with_prefixes(base.model, ids, mask, batch).logits, mask


def peft_model_with(base, prefix: Prefix):
    """PEFT's prefix-tuning model on a fresh copy of `base` holding exactly `prefix`."""
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix.spec.num_virtual_tokens)
    model = peft.get_peft_model(load_base(base.name).model, config)
    model.prompt_encoder["default"].embedding.weight.data.copy_(prefix.flat().detach())
    model.eval()
    return model


def test_logits_equal_peft_forward(tiny_base):
    prefix = random_prefix(tiny_base, tokens=5, seed=1)
    rows = _ids(tiny_base, ["hello world, this is a test"])
    ours, _ = _logits(tiny_base, rows, [prefix.key_values().detach()])
    with torch.no_grad():
        theirs = peft_model_with(tiny_base, prefix)(input_ids=torch.tensor(rows)).logits
    without = _logits(tiny_base, rows, [None])[0]
    assert (ours - without).abs().max() > 1e-2, "the prefix must change the logits"
    assert (ours - theirs).abs().max() < 1e-5


def test_mixed_batch_rows_equal_rows_alone(tiny_base):
    texts = ["short", "a somewhat longer prompt here", "mid length one", "x"]
    rows = _ids(tiny_base, texts)
    prefixes = [
        random_prefix(tiny_base, 3, seed=2).key_values().detach(),
        random_prefix(tiny_base, 7, seed=3).key_values().detach(),
        None,
        concat_key_values(
            random_prefix(tiny_base, 2, seed=4).key_values().detach(),
            random_prefix(tiny_base, 4, seed=5).key_values().detach(),
        ),
    ]
    batched, mask = _logits(tiny_base, rows, prefixes)
    assert torch.isfinite(batched[mask.bool()]).all()
    for i, (row, prefix) in enumerate(zip(rows, prefixes, strict=True)):
        alone, _ = _logits(tiny_base, [row], [prefix])
        real = batched[i][mask[i].bool()]  # drop left padding
        assert (real - alone[0]).abs().max() < 1e-5, f"row {i} differs from its run alone"


def test_left_padding_keeps_positions(tiny_base):
    prefix = random_prefix(tiny_base, 4, seed=6).key_values().detach()
    row = _ids(tiny_base, ["padding must not shift positions"])[0]
    alone, _ = _logits(tiny_base, [row], [prefix])
    padded, mask = _logits(tiny_base, [row, row + row], [prefix, prefix])
    assert (padded[0][mask[0].bool()] - alone[0]).abs().max() < 1e-5


def test_mixed_batch_greedy_equals_per_user(tiny_base):
    rows = _ids(tiny_base, ["first user asks", "second", "the third user has a longer question"])
    prefixes = [
        random_prefix(tiny_base, 2, seed=7, scale=3.0).key_values().detach(),
        None,
        random_prefix(tiny_base, 6, seed=8, scale=3.0).key_values().detach(),
    ]
    params = SamplingParams(max_new_tokens=12)
    together = generate_tokens(tiny_base.model, tiny_base.tokenizer, rows, prefixes, params)
    alone = [
        generate_tokens(tiny_base.model, tiny_base.tokenizer, [r], [p], params)[0]
        for r, p in zip(rows, prefixes, strict=True)
    ]
    assert together == alone
    assert together[0] != together[1], "different prefixes should give different continuations"


def test_generation_uses_prefix_step_by_step(tiny_base):
    """Our decode loop equals a from-scratch forward over prompt + generated tokens at every step."""
    prefix = random_prefix(tiny_base, 4, seed=9, scale=3.0).key_values().detach()
    row = _ids(tiny_base, ["reference check"])[0]
    tokens = generate_tokens(tiny_base.model, tiny_base.tokenizer, [row], [prefix], SamplingParams(max_new_tokens=8))[0]
    sequence = list(row)
    for token in tokens:
        logits, _ = _logits(tiny_base, [sequence], [prefix])
        assert int(logits[0, -1].argmax()) == token
        sequence.append(token)
    base_only = generate_tokens(tiny_base.model, tiny_base.tokenizer, [row], [None], SamplingParams(max_new_tokens=8))
    assert base_only[0] != tokens, "a strong prefix must change the output"


def test_only_prefix_gets_gradients(tiny_base):
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    prefix = random_prefix(tiny_base, 4, seed=10, projection=True)
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=1e-2)
    rows = _ids(tiny_base, ["train on this text", "and on this"])
    ids, mask = left_pad(rows, tiny_base.tokenizer.pad_token_id)
    for _ in range(3):
        kv = prefix.key_values()
        batch = stack_prefixes([kv, kv], dtype=tiny_base.dtype, device="cpu")
        logits = forward_with_prefixes(tiny_base.model, ids, mask, batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.parameters())
    assert all(p.grad is None for p in tiny_base.model.parameters())
    after = tiny_base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"


def test_running_batch_cache_rows_join_and_leave_without_copying_the_others():
    from fedprefix.common.attention import batch_cache, cache_layers, drop_rows, join_rows

    def group(rows, width, real, seed):  # one layer; row r has its last real[r] slots in use
        g = torch.Generator().manual_seed(seed)
        keys, values = (torch.randn(rows, 2, width, 4, generator=g) for _ in range(2))
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in real])
        return [(keys, values)], mask

    def real_slots(layers, mask, row):
        keys, values = layers[0]
        used = mask[row].bool()
        return keys[row][:, used], values[row][:, used]

    def rows_hold(cache, mask, expected):  # row i of the batch holds expected[i]'s real slots
        for row, (keys, values) in enumerate(expected):
            got_keys, got_values = real_slots(cache_layers(cache), mask, row)
            assert torch.equal(got_keys, keys) and torch.equal(got_values, values)

    first, first_mask = group(3, 6, [6, 2, 4], seed=0)
    second, second_mask = group(4, 9, [3, 9, 5, 1], seed=1)
    picked = torch.tensor([1, 3])
    cache, mask = batch_cache([(first, first_mask, None), (second, second_mask, picked)], row_capacity=8)
    assert mask.shape == (5, 9) and cache.layers[0]._keys.shape[2] > 9  # room to grow
    expected = [real_slots(first, first_mask, r) for r in range(3)] + [
        real_slots(second, second_mask, r) for r in (1, 3)
    ]
    rows_hold(cache, mask, expected)
    assert torch.all(cache_layers(cache)[0][0][:3, :, :3] == 0)  # the first group's added padding: zeros
    buffer = cache.layers[0]._keys.data_ptr()

    # Joiners no wider than the batch go into its spare rows: the buffer stays, its rows untouched.
    third, third_mask = group(2, 7, [7, 3], seed=2)
    cache, mask = join_rows(cache, mask, third, third_mask, torch.tensor([1, 0]), max_rows=8)
    assert cache.layers[0]._keys.data_ptr() == buffer and mask.shape == (7, 9)
    expected += [real_slots(third, third_mask, r) for r in (1, 0)]
    rows_hold(cache, mask, expected)
    assert torch.all(cache_layers(cache)[0][0][5:, :, :2] == 0)  # the joiners' padding: zeros

    # Rows leave in place (row 3 uses every column: no padding to trim); the last rows fill their gaps.
    cache, mask, order = drop_rows(cache, mask, [0, 2, 3, 5, 6])
    assert cache.layers[0]._keys.data_ptr() == buffer and order == [0, 5, 2, 3, 6]
    expected = [expected[old] for old in order]
    rows_hold(cache, mask, expected)

    # Wider joiners than the batch, or more than its spare rows: built anew, all rows kept.
    wide, wide_mask = group(1, 12, [12], seed=3)
    cache, mask = join_rows(cache, mask, wide, wide_mask, torch.tensor([0]), max_rows=8)
    assert cache.layers[0]._keys.data_ptr() != buffer and mask.shape == (6, 12)
    expected.append(real_slots(wide, wide_mask, 0))
    rows_hold(cache, mask, expected)
    many, many_mask = group(4, 3, [3, 3, 3, 3], seed=4)
    cache, mask = join_rows(cache, mask, many, many_mask, torch.arange(4), max_rows=16)
    expected += [real_slots(many, many_mask, r) for r in range(4)]
    rows_hold(cache, mask, expected)
    assert cache.layers[0]._keys.shape[0] == 16  # room for twice its rows, at most max_rows

    cache, lone_mask, order = drop_rows(cache, mask, [6])  # one 3-slot row left of 12: padding trimmed
    assert order == [6] and lone_mask.shape == (1, 3)
    rows_hold(cache, lone_mask, [expected[6]])
