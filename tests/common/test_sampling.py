"""Token picking at the edges of the sampling settings: never a failed row for a setting the API accepts."""

from __future__ import annotations

import torch
from fedprefix.common.generation import SamplingParams, make_generator, pick_tokens


def test_a_temperature_too_small_to_divide_by_is_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    for temperature in (1e-40, 5e-324, 1e-6):
        params = SamplingParams(temperature=temperature, seed=1)
        assert params.greedy and make_generator(params, "cpu") is None
        picked = pick_tokens(logits, [params] * 4, [None] * 4)
        assert picked.tolist() == logits.argmax(dim=-1).tolist()
    assert not SamplingParams(temperature=1e-4).greedy


def test_a_top_p_that_rounds_to_zero_keeps_the_top_token():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    for top_p in (5e-324, 1e-45, 1e-9):
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=3)
        generators = [make_generator(params, "cpu") for _ in range(3)]
        picked = pick_tokens(logits, [params] * 3, generators)
        assert picked.tolist() == logits.argmax(dim=-1).tolist()


def test_an_unseeded_request_leaves_torch_global_random_state_alone():
    # a caller's torch.manual_seed must still reproduce its own draws after a sampling request
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first, second = (make_generator(SamplingParams(temperature=1.0), "cpu") for _ in range(2))
    assert torch.equal(torch.rand(3), expected)
    assert first.initial_seed() != second.initial_seed()  # each unseeded request draws its own seed


def test_penalties_lower_the_logits_of_tokens_already_generated_as_openai_defines_them():
    logits = torch.tensor([[3.0, 2.5, 0.0, 1.0]])
    outputs = [[0, 0, 3]]  # token 0 twice, token 3 once
    plain = SamplingParams()
    assert pick_tokens(logits, [plain], [None], outputs).tolist() == [0]  # no penalty: as without outputs
    presence = SamplingParams(presence_penalty=0.6)  # 3.0 - 0.6 = 2.4 < 2.5
    assert pick_tokens(logits, [presence], [None], outputs).tolist() == [1]
    frequency = SamplingParams(frequency_penalty=0.3)  # 3.0 - 2 * 0.3 = 2.4 < 2.5; once would be 2.7
    assert pick_tokens(logits, [frequency], [None], outputs).tolist() == [1]
    assert pick_tokens(logits, [frequency], [None], [[0]]).tolist() == [0]
    favoured = SamplingParams(frequency_penalty=-2.0)  # negative: repeats favoured, 1.0 + 2 * 2 > 3.0
    assert pick_tokens(logits, [favoured], [None], [[3, 3]]).tolist() == [3]
    rows = torch.cat([logits, logits])  # one row's penalty leaves its batch mate alone
    assert pick_tokens(rows, [presence, plain], [None, None], [outputs[0], outputs[0]]).tolist() == [1, 0]
    assert torch.equal(logits, torch.tensor([[3.0, 2.5, 0.0, 1.0]])), "the caller's logits are left as they were"


def test_seeds_apart_by_2_to_the_32_sample_apart():
    """torch's CPU generator keeps 32 bits of a seed: 0 and 2**32, -1 and 2**32 - 1 had given one
    stream (a reviewer's finding)."""
    from fedprefix.common.generation import SamplingParams, make_generator

    def draws(seed: int) -> list[float]:
        return torch.rand(4, generator=make_generator(SamplingParams(temperature=1.0, seed=seed), "cpu")).tolist()

    for a, b in ((0, 2**32), (-1, 2**32 - 1), (5, 5 - 2**32)):
        assert draws(a) != draws(b), (a, b)
    assert draws(7) == draws(7)
