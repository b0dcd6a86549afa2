"""Token generation with one prefix per batch row: greedy or nucleus sampling, stop strings.

transformers' ``generate`` cannot give each row its own prefix and positions (and
PEFT 0.21's ``generate`` silently drops the prefix), so decoding is a plain loop over
the same injection as training: prefill prompt behind the prefix, then one token
per step, each row with its own position counter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .attention import decode_step, prefill, stack_prefixes
from .config import a_number
from .errors import ConfigError


class SamplingParams(BaseModel):
    """How to pick tokens for one request."""

    model_config = ConfigDict(allow_inf_nan=False)  # a NaN temperature was refused as "more than 10"
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=10.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # fixes sampling for this row alone, whatever its batch mates; the range torch's generators take
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: list[str] = Field(default_factory=list)  # output is cut before the first stop string
    ignore_eos: bool = False  # keep going past EOS up to max_new_tokens (benchmarks, as vLLM's flag)
    # OpenAI's: a token's logit drops by presence_penalty once it occurs in the output so far, and
    # by frequency_penalty for each time it does (negative values favour repeats)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    _numbers = field_validator(
        "max_new_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", mode="before"
    )(a_number)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, stop):
        """A str is one stop string (as OpenAI's `stop`), not its characters; None is none."""
        return [stop] if isinstance(stop, str) else [] if stop is None else stop

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 pick the argmax (vLLM's _SAMPLING_EPS): logits / 1e-40 overflow."""
        return self.temperature < 1e-5


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), rows aligned to the right."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ConfigError("every prompt must have at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def penalized(logits: torch.Tensor, params: Sequence[SamplingParams], outputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """float32 logits (B, V) with each row's presence and frequency penalties applied over the
    tokens it has generated so far (`outputs`), as OpenAI and vLLM apply them."""
    scores = logits.to(torch.float32, copy=True)  # the caller's logits stay as they were
    for row, (p, tokens) in enumerate(zip(params, outputs, strict=True)):
        if tokens and (p.presence_penalty or p.frequency_penalty):
            seen, counts = torch.tensor(tokens, device=logits.device).unique(return_counts=True)  # (K,) each
            scores[row].index_add_(0, seen, -(p.frequency_penalty * counts.float() + p.presence_penalty))
    return scores


def pick_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence,
    outputs: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Next token per row from `logits` (B, V): argmax where greedy, else top-p sampling; behind
    each row's penalties over its `outputs` so far (the tokens it generated), where given."""
    penalties = outputs is not None and any(p.presence_penalty or p.frequency_penalty for p in params)
    scores = penalized(logits, params, outputs) if penalties else logits.float()  # (B, V)
    # max(...).indices on float32 is argmax (the first maximal index) at a third of the cost:
    # torch's CPU argmax is not vectorized, and is slowest on bfloat16
    chosen = scores.max(dim=-1).indices  # (B,)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(scores[row] / p.temperature, dim=-1)  # (V,)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            keep[0] = True  # the top token always (a top_p that float32 rounds to 0 would keep none)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        chosen[row] = torch.multinomial(probs, 1, generator=generators[row]).squeeze(0)
    return chosen


def stop_index(text: str, stops: Sequence[str], new_from: int = 0) -> int | None:
    """Index where the first stop string starts in `text`, or None; `new_from`: text before this
    index was searched already, so only stop strings that end after it are looked for."""
    hits = [i for i in (text.find(s, max(0, new_from - len(s) + 1)) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    prefixes: Sequence[torch.Tensor | None],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[str]:
    """Generate text for a batch of prompts (token ids), row b behind prefix b ((L, 2, H, P, D) or None)."""
    params = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
    results = []
    for tokens, p in zip(generate_tokens(model, tokenizer, prompt_ids, prefixes, params), params, strict=True):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = stop_index(text, p.stop)
        results.append(text if cut is None else text[:cut])
    return results


@torch.no_grad()
def generate_tokens(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    prefixes: Sequence[torch.Tensor | None],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[list[int]]:
    """New token ids per row (without EOS); a row ends at EOS, a stop string or max_new_tokens."""
    batch = len(prompt_ids)
    if len(prefixes) != batch:
        raise ConfigError(f"{len(prefixes)} prefixes for {batch} prompts")
    params = [params] * batch if isinstance(params, SamplingParams) else list(params)
    if len(params) != batch:
        raise ConfigError(f"{len(params)} sampling settings for {batch} prompts")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generators = [make_generator(p, device) for p in params]
    eos = eos_ids(model, tokenizer)

    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    prefix_batch = stack_prefixes(prefixes, dtype=dtype, device=device)
    logits, cache = prefill(model, ids, mask, prefix_batch)  # (B, V)
    full_mask = torch.cat([prefix_batch.mask, mask], dim=1)  # (B, Pmax + T), grows by one per step
    next_position = prefix_batch.lengths + mask.sum(dim=1)  # (B,)

    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max(p.max_new_tokens for p in params)):
        tokens = pick_tokens(logits, params, generators, generated)  # (B,)
        picked = tokens.tolist()  # one wait for a GPU per step, not one per row
        for row in range(batch):
            if done[row]:
                continue
            token = picked[row]
            if token in eos and not params[row].ignore_eos:
                done[row] = True
                continue
            generated[row].append(token)
            if params[row].stop:
                text = tokenizer.decode(generated[row], skip_special_tokens=True)
                done[row] = stop_index(text, params[row].stop) is not None
            done[row] = done[row] or len(generated[row]) >= params[row].max_new_tokens
        if all(done):
            break
        full_mask = torch.cat([full_mask, torch.ones(batch, 1, dtype=full_mask.dtype, device=device)], dim=1)
        # finished rows run on but are ignored
        logits, cache = decode_step(model, tokens.unsqueeze(1), full_mask, next_position.unsqueeze(1), cache)
        next_position = next_position + 1
    return generated


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The row's own random generator (None when greedy), seeded from params.seed if set."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()  # a fresh random seed for this generator; torch.seed() would reseed torch's global one
    else:
        generator.manual_seed(_mixed(params.seed))
    return generator


def _mixed(seed: int) -> int:
    """A 64-bit seed hashed down to the 32 bits torch's CPU generator keeps: taken as it is, the
    seeds 0 and 2**32, or -1 and 2**32 - 1, gave one stream (clients pick seeds as they like)."""
    digest = hashlib.blake2b(seed.to_bytes(9, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's configured ones."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}
