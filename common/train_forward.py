"""A lean training forward for Llama-architecture bases (Llama, Qwen2): completion loss behind one prefix.

Why: most of a training step is matrix products (CPU, float32), so it gets faster only by
doing fewer of them. transformers' forward runs every row of a batch over every
position of every layer; the loss needs less, with the same arithmetic:

- rows are packed one after another, not padded to the longest: projections and MLPs
  run on real tokens only (on real text, a third of a left-padded batch is pads); only
  attention lays the rows out in a padded grid;
- every row of a training batch sits behind the same prefix, and rows share a long
  token head (SmolLM2's chat template puts the same system prompt in every row): the
  head runs once, at batch size 1, and all rows attend to [prefix ; head keys/values];
- a row's last token is only a label: no position reads it, so it is not run;
- at the last layer, positions that predict no completion token only give keys and
  values: queries, attention output, MLP, final norm and LM head run on the
  completion-predicting positions alone.

Per layer the weights are transformers' own (no copies; autograd flows back to the
prefix keys/values), with transformers' RMSNorm order of operations, rotary embedding
(queries and keys rotated in one pass) and SDPA attention with grouped-query heads.
Tests hold its loss and prefix gradient to the plain transformers path.

Bases of another architecture (GPT-2), another activation or
attention dropout in training mode are not covered (`unsupported_reason`); the caller
runs those through transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .attention import padded_heads
from .base_model import lean_unsupported_reason
from .llama_math import additive_mask, rms_norm, rotate


def unsupported_reason(model) -> str | None:
    """Why the lean training forward cannot run `model` (None: it can)."""
    reason = lean_unsupported_reason(model)
    if reason is None and model.training and getattr(model.config, "attention_dropout", 0.0):
        return "attention dropout in training mode"
    return reason


def shared_head_length(prompts: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every row, stopping before any row's last prompt token.

    That last prompt token predicts the first completion token, so every
    completion-predicting position stays in the rows' own tails.
    """
    limit = min(len(p) for p in prompts) - 1
    first = rows[0]
    head = 0
    while head < limit and all(row[head] == first[head] for row in rows):
        head += 1
    return head


def _norm(x: torch.Tensor, norm) -> torch.Tensor:
    """rms_norm with a transformers LlamaRMSNorm module's weight and epsilon."""
    return rms_norm(x, norm.weight, norm.variance_epsilon)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention with grouped-query heads: q (B, H, T, D), k and v (B, Hkv, S, D), bias (B, 1, T, S).

    The G = H / Hkv query heads of a key/value head are folded into its query rows, so
    keys and values are read in place (SDPA's math kernel copies them G times, and checks
    the mask for fully masked rows on every call); the scale is applied to the queries.
    """
    batch, heads, length, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    folded = (q * scale).reshape(batch, kv_heads, group * length, dim)  # (B, Hkv, G*T, D)
    scores = folded @ k.transpose(2, 3)  # (B, Hkv, G*T, S)
    scores = scores.view(batch, kv_heads, group, length, keys) + bias.unsqueeze(2)  # (B, Hkv, G, T, S)
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * length, keys)  # (B, Hkv, G*T, S)
    return (probs @ v).view(batch, heads, length, dim)  # (B, H, T, D)


def _mlp(x: torch.Tensor, mlp) -> torch.Tensor:
    """transformers' LlamaMLP on x (N, hidden) -> (N, hidden)."""
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def lean_completion_loss(
    model, kv: torch.Tensor | None, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over completion tokens, their number), every row behind prefix `kv`.

    kv: (L, 2, Hkv, P, D) or None. Every prompt and completion must hold at least one token.
    Equal, up to float reassociation, to the loss of transformers' forward over the
    left-padded rows behind the prefix (positions counted from P, as in common.attention).
    """
    config, decoder = model.config, model.model
    embed = decoder.embed_tokens.weight  # (V, hidden)
    device, dtype = embed.device, embed.dtype
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    batch = len(rows)
    head = shared_head_length(prompts, rows)
    prefix_len = 0 if kv is None else kv.shape[3]
    if kv is not None:
        kv = kv.to(device=device, dtype=dtype)  # (L, 2, Hkv, P, D)

    # the rows' own tokens after the head, without the last one (only a label), packed one
    # after another (R tokens): projections and MLPs never see a pad. Only attention reads
    # them in a left-padded grid (B, T).
    tails = [row[head:-1] for row in rows]
    sizes = torch.tensor([len(t) for t in tails])  # (B,)
    length = int(sizes.max())
    real = torch.arange(length).unsqueeze(0) >= length - sizes.unsqueeze(1)  # (B, T)
    grid_at = real.reshape(-1).nonzero().squeeze(1).to(device)  # (R,) packed token -> grid cell
    real = real.to(device)
    ids = torch.tensor(rows[0][:head] + [t for tail in tails for t in tail], dtype=torch.long)  # (h + R,)

    # positions: the head from P, each row's tail from P + h
    positions = torch.cat([torch.arange(head)] + [torch.arange(n) + head for n in sizes.tolist()]) + prefix_len

    # keys seen by the tail queries: [prefix (P) | head (h) | tail (T)]
    query_at = torch.arange(length, device=device).unsqueeze(1)  # (T, 1)
    key_at = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
    # causal over real tokens; a pad query also sees itself so that its row stays finite
    tail_allowed = (real.unsqueeze(1) & (key_at <= query_at)) | (key_at == query_at)  # (B, T, T)
    seen = torch.ones(batch, length, prefix_len + head, dtype=torch.bool, device=device)  # (B, T, P + h)
    tail_bias = additive_mask(torch.cat([seen, tail_allowed], dim=2).unsqueeze(1), dtype)  # (B, 1, T, S)
    head_causal = torch.ones(head, head, dtype=torch.bool, device=device).tril()  # (h, h)
    head_allowed = torch.cat([torch.ones(head, prefix_len, dtype=torch.bool, device=device), head_causal], dim=1)
    head_bias = additive_mask(head_allowed[None, None], dtype)  # (1, 1, h, P + h)

    # completion-predicting positions: the last c_b tokens of tail b, in completion token order
    counts = [len(c) for c in completions]
    ends = sizes.cumsum(0).tolist()  # (B,) packed offset after each tail
    predicting = [i for end, c in zip(ends, counts, strict=True) for i in range(end - c, end)]
    predicting = torch.tensor(predicting, device=device)  # (N,) packed tail offsets
    span = max(counts)  # C: their grid columns are the last C
    slot = torch.arange(span, device=device).unsqueeze(0)  # (1, C)
    predict = slot >= span - torch.tensor(counts, device=device).unsqueeze(1)  # (B, C), row-major = token order
    targets = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=device)  # (N,)

    hidden = F.embedding(ids.to(device), embed)  # (h + R, hidden)
    cos, sin = decoder.rotary_emb(hidden, position_ids=positions.to(device).unsqueeze(0))  # each (1, h + R, D)
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (h + R, 1, D)
    scale = dim**-0.5
    layers = decoder.layers[: config.num_hidden_layers]
    for i, layer in enumerate(layers):
        attn, last = layer.self_attn, i == len(layers) - 1
        x = _norm(hidden, layer.input_layernorm)  # (h + R, hidden)
        k = rotate(attn.k_proj(x).view(-1, kv_heads, dim), cos, sin)  # (h + R, Hkv, D)
        v = attn.v_proj(x).view(-1, kv_heads, dim)  # (h + R, Hkv, D)
        # split, not slices: the backward of a split is one concatenation (a slice's zero-fills a full copy)
        head_k, tail_k = k.split([head, len(grid_at)])
        head_v, tail_v = v.split([head, len(grid_at)])
        head_k, tail_k = head_k.transpose(0, 1), padded_heads(tail_k, grid_at, batch, length)
        head_v, tail_v = head_v.transpose(0, 1), padded_heads(tail_v, grid_at, batch, length)
        # head_k, head_v: (Hkv, h, D); tail_k, tail_v: (B, Hkv, T, D)
        shared_k, shared_v = head_k, head_v  # (Hkv, P + h, D) once the prefix is in front
        if kv is not None:
            shared_k, shared_v = torch.cat([kv[i, 0], head_k], dim=1), torch.cat([kv[i, 1], head_v], dim=1)
        keys = torch.cat([shared_k.expand(batch, -1, -1, -1), tail_k], dim=2)  # (B, Hkv, S, D)
        values = torch.cat([shared_v.expand(batch, -1, -1, -1), tail_v], dim=2)  # (B, Hkv, S, D)
        if last:  # only the completion-predicting positions go on
            at = predicting + head  # (N,) rows of x
            q = rotate(attn.q_proj(x[at]).view(-1, heads, dim), cos[at], sin[at])  # (N, H, D)
            q = padded_heads(q, predict.reshape(-1).nonzero().squeeze(1), batch, span)  # (B, H, C, D)
            out = _attend(q, keys, values, tail_bias[:, :, length - span :], scale)  # (B, H, C, D)
            out = out.transpose(1, 2)[predict].reshape(-1, heads * dim)  # (N, H*D)
            hidden = hidden[at] + attn.o_proj(out)  # (N, hidden)
            hidden = hidden + _mlp(_norm(hidden, layer.post_attention_layernorm), layer.mlp)
            break
        q = rotate(attn.q_proj(x).view(-1, heads, dim), cos, sin)  # (h + R, H, D)
        head_q, tail_q = q.split([head, len(grid_at)])
        head_q = head_q.transpose(0, 1).unsqueeze(0)  # (1, H, h, D)
        tail_q = padded_heads(tail_q, grid_at, batch, length)  # (B, H, T, D)
        out_tail = _attend(tail_q, keys, values, tail_bias, scale)  # (B, H, T, D)
        out_tail = out_tail.transpose(1, 2).reshape(batch * length, heads * dim).index_select(0, grid_at)  # (R, H*D)
        if head:
            out_head = _attend(head_q, shared_k.unsqueeze(0), shared_v.unsqueeze(0), head_bias, scale)  # (1, H, h, D)
            out_tail = torch.cat([out_head[0].transpose(0, 1).reshape(head, heads * dim), out_tail])
        hidden = hidden + attn.o_proj(out_tail)  # (h + R, hidden)
        hidden = hidden + _mlp(_norm(hidden, layer.post_attention_layernorm), layer.mlp)
    logits = model.get_output_embeddings()(_norm(hidden, decoder.norm)).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())
