"""The lean training forward: the same loss and prefix gradient as transformers' forward."""

from __future__ import annotations

import pytest
import torch
from fedprefix.client.data import Example
from fedprefix.client.training import completion_loss, train_step, transformers_completion_loss
from fedprefix.common.base_model import load_base
from fedprefix.common.train_forward import shared_head_length, unsupported_reason

from tests.conftest import random_prefix


def _tokens(generator, vocab: int, count: int) -> list[int]:
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


def _batch(base, head: int, shapes, seed: int = 0) -> list[Example]:
    """Rows of (prompt tail, completion) lengths `shapes`, all starting with the same `head` tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocab = base.model.config.vocab_size
    shared = _tokens(generator, vocab, head)
    return [
        Example(shared + _tokens(generator, vocab, p), _tokens(generator, vocab, c), row)
        for row, (p, c) in enumerate(shapes)
    ]


def _loss_and_grad(loss_fn, base, kv, batch):
    kv = kv.detach().clone().requires_grad_(True)
    loss, count = loss_fn(base, kv, batch)
    loss.backward()
    return loss.detach(), count, kv.grad


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize(
    ("head", "shapes"),
    [
        (7, [(3, 4), (6, 2), (1, 5), (4, 1)]),  # a shared head, rows of different lengths
        (0, [(2, 3), (5, 1), (1, 2)]),  # nothing shared
        (5, [(0, 3), (0, 3)]),  # the head is the whole prompt (it stops before the last prompt token)
        (4, [(2, 6)]),  # one row
    ],
)
def test_lean_loss_and_prefix_gradient_match_transformers(name, head, shapes):
    base = load_base(name)
    assert unsupported_reason(base.model) is None
    batch = _batch(base, head, shapes)
    kv = random_prefix(base, tokens=3, scale=0.5).key_values().detach()  # (L, 2, Hkv, P, D)
    lean, lean_count, lean_grad = _loss_and_grad(completion_loss, base, kv, batch)
    plain, plain_count, plain_grad = _loss_and_grad(transformers_completion_loss, base, kv, batch)
    assert lean_count == plain_count == sum(len(ex.completion) for ex in batch)
    torch.testing.assert_close(lean, plain)
    torch.testing.assert_close(lean_grad, plain_grad)
    assert lean_grad.abs().sum() > 0


def test_lean_forward_projects_no_pads(tiny_llama):
    """Rows of very different lengths: the projections see the head once and each row's own tokens."""
    head, shapes = 5, [(1, 1), (30, 20), (2, 3)]
    batch = _batch(tiny_llama, head, shapes)
    seen = []
    hook = tiny_llama.model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0])
    )
    try:
        completion_loss(tiny_llama, random_prefix(tiny_llama, tokens=2).key_values().detach(), batch)
    finally:
        hook.remove()
    # a row's last token is only a label; the head (shared tokens) runs once
    assert seen == [head + sum(p + c - 1 for p, c in shapes)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_lean_loss_without_prefix_matches(name):
    base = load_base(name)
    batch = _batch(base, 6, [(2, 3), (4, 2), (1, 1)])
    with torch.no_grad():
        lean, plain = completion_loss(base, None, batch), transformers_completion_loss(base, None, batch)
    torch.testing.assert_close(lean[0], plain[0])
    assert lean[1] == plain[1]


def test_empty_prompt_falls_back_to_transformers(tiny_llama):
    batch = _batch(tiny_llama, 0, [(3, 2), (0, 4)])
    kv = random_prefix(tiny_llama, tokens=2).key_values().detach()
    with torch.no_grad():
        torch.testing.assert_close(
            completion_loss(tiny_llama, kv, batch)[0], transformers_completion_loss(tiny_llama, kv, batch)[0]
        )


def test_shared_head_length_stops_before_last_prompt_token():
    assert shared_head_length([[1, 2, 3], [1, 2, 4]], [[1, 2, 3, 9], [1, 2, 4, 9]]) == 2
    assert shared_head_length([[1, 2, 3], [1, 2, 3]], [[1, 2, 3, 9], [1, 2, 3, 8]]) == 2
    assert shared_head_length([[5], [5, 6]], [[5, 7], [5, 6, 7]]) == 0


def test_gpt2_trains_through_transformers():
    base = load_base("tiny-gpt2")
    assert unsupported_reason(base.model) is not None
    prefix = random_prefix(base, tokens=3, scale=0.1)
    params = list(prefix.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    batch = _batch(base, 4, [(3, 4), (1, 2), (5, 3)])
    losses = [train_step(base, prefix.key_values, batch, optimizer, params) for _ in range(8)]
    assert losses[-1] < losses[0]
