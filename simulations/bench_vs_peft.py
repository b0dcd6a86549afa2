"""The serving engine vs PEFT's way of serving prefixes (per user: load the adapter, `generate`),
each in its faster dtype on this machine, in alternating rounds, for a first request of every
user and for a second one (the chat's history again and a new question), where the engine
reuses the users' cached prompt KV. Used by bench_serving.
"""

from __future__ import annotations

import statistics
import time

import torch
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams, generate_tokens
from fedprefix.common.precision import resolve_dtype
from fedprefix.common.store import PrefixStore
from fedprefix.coordinator.serving import Engine

from .bench_serving import key_of, questions_for, requests_for, tokens_per_second


def peft_generate_fixed(peft_model) -> None:
    """Make PEFT 0.21.2's generate use the prefix with transformers 5.24.

    transformers now returns the cache as `cache` from prepare_inputs_for_generation,
    while PEFT looks for `past_key_values`, finds none, and injects a prompt the model
    then ignores. Renaming it back lets PEFT's own logic run as designed.
    """
    original = peft_model.base_model_prepare_inputs_for_generation

    def renamed(*args, **kwargs):
        if "cache" in kwargs:
            kwargs["past_key_values"] = kwargs.pop("cache")
        out = original(*args, **kwargs)
        if "cache" in out:
            out["past_key_values"] = out.pop("cache")
        return out

    peft_model.base_model_prepare_inputs_for_generation = renamed


class PeftLoop:
    """PEFT's way, per user: put the user's prefix into the adapter, then `generate`."""

    def __init__(
        self, base_name: str, store: PrefixStore, users: list[str], dtype: torch.dtype, device: torch.device
    ) -> None:
        import peft

        peft_base = load_base(base_name, dtype=dtype, device=device)
        spec_tokens = store.load(users[0], key_of(users[0])).spec.num_virtual_tokens
        self.model = peft.get_peft_model(
            peft_base.model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec_tokens)
        )
        self.model.to(dtype).eval()
        peft_generate_fixed(self.model)
        self.embedding = self.model.prompt_encoder["default"].embedding.weight
        self.tokenizer, self.store, self.device = peft_base.tokenizer, store, device

    @torch.no_grad()
    def one_user(self, user: str, prompt: str, params: SamplingParams) -> list[int]:
        self.embedding.copy_(self.store.load(user, key_of(user)).flat())  # "set adapter"
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.max_new_tokens,
            do_sample=False,
        )
        return out[0, ids.shape[1] :].tolist()

    def run(self, users, prompts, params) -> tuple[float, list[list[int]]]:
        """Tokens/s over `users` one after the other, and their outputs."""
        started = time.perf_counter()
        outputs = [self.one_user(u, p, params) for u, p in zip(users, prompts, strict=True)]
        return sum(map(len, outputs)) / (time.perf_counter() - started), outputs


def engine_rate(base, store, requests, returning=None) -> float:
    """Tokens/s of a fresh engine (cold prefix and prompt caches, as PEFT's loop loads every prefix) on
    `requests`; with `returning`, the tokens/s of those next requests of the same users afterwards."""
    engine = Engine(base, store=store, max_batch_size=len(requests))  # not started: runs on this thread
    tokens_per_second(engine, requests[:2])  # warm-up, as PEFT's loop gets one
    first = tokens_per_second(engine, requests)
    return first if returning is None else tokens_per_second(engine, returning)


def next_turns(base, questions: list[str], replies: list[list[int]]) -> list[str]:
    """Each chat's next request: its history again (question, the reply) and a new question."""
    tok = base.tokenizer
    return [
        tok.apply_chat_template(
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)},
                {"role": "user", "content": "Thanks. And what would you order there?"},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for question, reply in zip(questions, replies, strict=True)
    ]


def engine_vs_peft(base_name, base, store, users, prompts, params, peft_users: int, rounds: int) -> dict:
    """The engine vs PEFT's per-user loop, each in its faster dtype on this machine.

    PEFT's loop is timed in float32 and in bfloat16 on two users first, and the faster one is
    the baseline (a one-row bfloat16 matmul is slower than float32 on some CPUs, faster on
    others); the engine runs what `fedprefix serve` picks and, for the record, float32. The
    pair is then timed in `rounds` alternating rounds (PEFT's loop, then the engine) and
    compared by medians, so that the shared machine's load changes hit both alike: for a
    first request of every user (cold caches), and for a second one of the same users (their
    chat's history again and a new question), where the engine reuses their prompt KV.
    """
    tok = base.tokenizer
    loops = {dtype: PeftLoop(base_name, store, users, dtype, base.device) for dtype in (torch.float32, torch.bfloat16)}
    trial = {}
    for dtype, loop in loops.items():
        loop.run(users[:1], prompts[:1], params)  # warm-up, untimed, as the engine gets one
        trial[dtype] = loop.run(users[:2], prompts[:2], params)[0]
    peft_dtype = max(trial, key=trial.get)
    peft = loops[peft_dtype]
    requests = requests_for(users, prompts, params)
    serving = resolve_dtype("auto", base.device)
    engine_fp32 = engine_rate(base.with_dtype(torch.float32), store, requests)
    timed_users, timed_prompts = users[:peft_users], prompts[:peft_users]
    # a second request of the same users: the chat's history again and a new question
    replies = Engine(base.with_dtype(serving), store=store, max_batch_size=len(requests)).generate(requests)
    turns = next_turns(base, questions_for(len(users)), [r.tokens for r in replies])
    returning = requests_for(users, turns, params)
    peft_rates, engine_rates, peft_returning, engine_returning = [], [], [], []
    for _ in range(rounds):  # each round: PEFT's loop, then the engine, back to back
        peft_rates.append(peft.run(timed_users, timed_prompts, params)[0])
        engine_rates.append(engine_rate(base.with_dtype(serving), store, requests))
        peft_returning.append(peft.run(timed_users, turns[:peft_users], params)[0])
        engine_returning.append(engine_rate(base.with_dtype(serving), store, requests, returning))
    # The baseline must compute the right thing: the same greedy tokens as ours for the first user,
    # checked in float32, where two kernels' rounding cannot flip a near-tie within 16 tokens (in
    # bfloat16 it can, and a base with random weights, where nothing is peaked, has many near-ties).
    first = [tok(prompts[0], add_special_tokens=False).input_ids]
    first_prefix = [store.load(users[0], key_of(users[0])).key_values().detach()]
    ours = generate_tokens(base.with_dtype(torch.float32).model, tok, first, first_prefix, params)[0]
    theirs = loops[torch.float32].one_user(users[0], prompts[0], params)
    agree = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b), len(ours))
    if agree < min(16, len(ours)):
        raise RuntimeError(f"PEFT's generate disagrees with the reference at token {agree}: the baseline is wrong")
    per_round = [e / p for e, p in zip(engine_rates, peft_rates, strict=True)]
    per_round_returning = [e / p for e, p in zip(engine_returning, peft_returning, strict=True)]
    return {
        "peft_users_timed": peft_users,
        "rounds": rounds,
        "peft_trial_tokens_per_s": {str(d).removeprefix("torch."): round(r, 1) for d, r in trial.items()},
        "peft_dtype": str(peft_dtype).removeprefix("torch."),
        "peft_tokens_per_s": round(statistics.median(peft_rates), 1),
        "engine_dtype": str(serving).removeprefix("torch."),
        "engine_tokens_per_s": round(statistics.median(engine_rates), 1),
        "engine_fp32_tokens_per_s": round(engine_fp32, 1),
        "ratio_engine_over_peft": round(statistics.median(engine_rates) / statistics.median(peft_rates), 1),
        "ratio_per_round": f"{min(per_round):.1f}-{max(per_round):.1f}",
        "returning_prompt_tokens": round(statistics.mean(len(base.tokenizer(t).input_ids) for t in turns), 1),
        "returning_peft_tokens_per_s": round(statistics.median(peft_returning), 1),
        "returning_engine_tokens_per_s": round(statistics.median(engine_returning), 1),
        "ratio_returning_engine_over_peft": round(
            statistics.median(engine_returning) / statistics.median(peft_returning), 1
        ),
        "ratio_returning_per_round": f"{min(per_round_returning):.1f}-{max(per_round_returning):.1f}",
        "peft_tokens_equal_to_ours": f"{agree}/{len(ours)}",
    }
