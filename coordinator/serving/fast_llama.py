"""A lean forward of Llama-architecture bases (Llama, Qwen2) for the serving engine.

transformers' modules serve every use (training, hooks, every cache and attention
kind); the engine needs one thing from the base: next-token logits for a batch whose
KV cache grows. This forward reads the same weights and does the same arithmetic
(transformers' own RMSNorm order of operations, rotary embedding and rotation; SDPA
for attention), with fewer operations per layer and, on a CPU serving bfloat16, the
linear weights pre-packed once for oneDNN instead of re-packed on every call (the
serving benchmark measures the gain). Tests hold its logits
to the transformers forward and the engine's greedy tokens to the plain generation
loop, token for token.

Bases of another architecture (GPT-2) or another activation
run through transformers (`TransformersForward`), unchanged.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from fedprefix.common.attention import PrefixBatch, cache_layers, decode_step, padded_heads, prefill, token_positions
from fedprefix.common.base_model import lean_unsupported_reason
from fedprefix.common.llama_math import additive_mask, rms_norm, rotate

log = logging.getLogger(__name__)


class Prefill(NamedTuple):
    """Prompt tokens (B, T), left-padded (mask (B, T)), behind their prefixes."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefixes: PrefixBatch


class Decode(NamedTuple):
    """One token per running row (B, 1) at `positions` (B, 1); mask (B, S + 1) covers the cache plus it."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    cache: object  # a transformers Cache of the running batch, appended in place


class _Part(NamedTuple):
    """One part of a forward (decode rows, or a prefill chunk), as FastLlama._forward takes it."""

    input_ids: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    attend: object  # (layer, q, k, v) -> (B, H, T, D)
    real: torch.Tensor | None  # indices of the B * T tokens that are not left padding (None: all are)
    ends: torch.Tensor  # (B,) each row's last token among the real ones


class TransformersForward:
    """The engine's forward through the transformers model itself (any supported base)."""

    def __init__(self, model) -> None:
        self.model = model

    def prefill(self, input_ids, attention_mask, prefixes: PrefixBatch):
        """-> (next-token logits (B, V), per layer (keys, values) of prefix + prompt)."""
        logits, cache = prefill(self.model, input_ids, attention_mask, prefixes)
        return logits, cache_layers(cache)

    def decode_step(self, tokens, attention_mask, positions, cache) -> torch.Tensor:
        """-> next-token logits (B, V); `cache` (a transformers Cache) is appended in place."""
        return decode_step(self.model, tokens, attention_mask, positions, cache)[0]

    def step(self, chunk: Prefill | None, decode: Decode | None):
        """A prefill chunk and a decode step, one after the other: see FastLlama.step."""
        filled = None if chunk is None else self.prefill(*chunk)
        return filled, None if decode is None else self.decode_step(*decode)


def unsupported_reason(model) -> str | None:
    """Why the lean forward cannot serve `model` (None: it can)."""
    return lean_unsupported_reason(model)


def serving_forward(model, batch_hint: int = 64, cuda_graphs: bool = True):
    """The lean forward where the base is a plain Llama, else the transformers one; on a GPU
    (unless `cuda_graphs` is False) the lean forward's decode steps replay CUDA graphs."""
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("serving through transformers' forward: %s", reason)
        return TransformersForward(model)
    fast = FastLlama(model, batch_hint)
    if cuda_graphs and model.device.type == "cuda":
        from .cuda_graphs import GraphedDecode  # imports this module

        return GraphedDecode(fast)
    return fast


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
    """x (N, in) -> x @ weight.T + bias; on a CPU in bfloat16 with the weight pre-packed for oneDNN.

    torch's bfloat16 CPU matmul re-packs the weight into AMX's blocked layout on every
    call; packing it once makes a batch's projection faster with equal results (inductor's
    CPU backend does the same when it freezes weights).
    """
    packable = (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )
    if packable:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        except RuntimeError:  # a torch built without oneDNN's bf16 path
            pass
    return lambda x: F.linear(x, weight, bias)


def _one_query_attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """Attention of one new token per row: q (B, H, 1, D) over k, v (B, H_kv, S, D); bias (B, 1, 1, S)
    float32 -> (B, H, 1, D) in q's dtype.

    Two batched matmuls with SDPA's CPU precision: scores and softmax in float32; the
    probabilities rounded to the values' dtype before they weight the values (SDPA's CPU
    kernel rounds its unnormalised exponentials so), with float32 accumulation inside the
    product.
    In bfloat16 that reads every row's values once, where a float32 copy of them wrote and
    read them again at every layer (a step of the built-in base at 64 rows on the EPYC: 165 ms
    against 198 at ~356 slots, 100 against 106 at ~116). torch's CPU SDPA kernel (flash
    attention, built for long queries) took 6x as long for one query per row in bfloat16
    (2.4 ms vs 0.4 ms a layer at 64 rows).
    The query heads that share a KV head sit side by side (SDPA's enable_gqa grouping).
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()  # (B, H_kv, G, D)
    scores = torch.matmul(grouped, k.float().transpose(-1, -2)).mul_(scale).add_(bias)  # (B, H_kv, G, S)
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # (B, H_kv, G, D)
    return out.view(batch, heads, 1, dim).to(q.dtype)


def _fused_linear(projections, batch_hint: int):
    """One linear computing several nn.Linear of the same input, outputs side by side."""
    weight = torch.cat([p.weight for p in projections])
    if all(p.bias is None for p in projections):
        return _linear(weight, None, batch_hint)
    bias = torch.cat([p.weight.new_zeros(p.weight.shape[0]) if p.bias is None else p.bias for p in projections])
    return _linear(weight, bias, batch_hint)


class _Layer:
    def __init__(self, layer, batch_hint: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused_linear([attn.q_proj, attn.k_proj, attn.v_proj], batch_hint)
        self.q_size, self.kv_size = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        self.o = _fused_linear([attn.o_proj], batch_hint)
        self.gate, self.up = _fused_linear([mlp.gate_proj], batch_hint), _fused_linear([mlp.up_proj], batch_hint)
        self.down = _fused_linear([mlp.down_proj], batch_hint)
        self.norm_in = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm_post = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)


class FastLlama:
    """Prefill and decode for a Llama or Qwen2 causal LM, reading its weights (the model is not changed).

    Keeps a pre-packed copy of the linear weights on a bfloat16 CPU (the size of those
    weights); elsewhere it references the model's own tensors.
    """

    def __init__(self, model, batch_hint: int = 64) -> None:
        config, decoder = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.embed = decoder.embed_tokens.weight
        self.rotary = decoder.rotary_emb
        self.layers = [_Layer(layer, batch_hint) for layer in decoder.layers[: config.num_hidden_layers]]
        self.norm = (decoder.norm.weight, decoder.norm.variance_epsilon)
        self.head = _fused_linear([model.get_output_embeddings()], batch_hint)

    def prefill(self, input_ids, attention_mask, prefixes: PrefixBatch):
        """Prompts (B, T) behind their prefixes -> (next-token logits (B, V), per layer (keys, values))."""
        return self.step(Prefill(input_ids, attention_mask, prefixes), None)[0]

    def decode_step(self, tokens, attention_mask, positions, cache) -> torch.Tensor:
        """One token per row (B, 1) -> next-token logits (B, V); `cache` layers are appended in place."""
        return self.step(None, Decode(tokens, attention_mask, positions, cache))[1]

    def step(self, chunk: Prefill | None, decode: Decode | None):
        """A prefill chunk and a decode step in one forward (either may be None).

        -> ((chunk logits (B_p, V), per layer (keys, values) of prefix + chunk) or None,
            decode logits (B_d, V) or None). The two parts share every linear layer (one
            matmul over all their tokens, so the weights are read once, as in vLLM's chunked
            prefill) and attend separately, each row to its own keys only.
        """
        parts = []
        if decode is not None:
            parts.append(self._decode_part(decode))
        if chunk is not None:
            layers: list = []
            parts.append(self._prefill_part(chunk, layers))
        last = self._logits(self._forward(parts))  # (sum of rows, V): each row's last position
        decoded = last[: decode.tokens.shape[0]] if decode is not None else None
        if chunk is None:
            return None, decoded
        return (last[last.shape[0] - chunk.input_ids.shape[0] :], layers), decoded

    def _prefill_part(self, chunk: Prefill, layers: list):
        input_ids, attention_mask, prefixes = chunk
        length = input_ids.shape[1]
        start = prefixes.max_length  # prompt tokens sit after the (left-padded) prefix slots
        seen = torch.cat([prefixes.mask, attention_mask.long()], dim=1).bool()  # (B, S)
        query_at = torch.arange(length, device=input_ids.device).unsqueeze(1) + start  # (T, 1)
        key_at = torch.arange(start + length, device=input_ids.device).unsqueeze(0)  # (1, S)
        # causal over real slots; each query also sees itself so that padding rows stay finite
        allowed = (seen.unsqueeze(1) & (key_at <= query_at)) | (key_at == query_at)  # (B, T, S)
        bias = additive_mask(allowed.unsqueeze(1), self.embed.dtype)  # (B, 1, T, S)

        def attend(i, q, k, v):
            if prefixes.key_values is not None:
                k = torch.cat([prefixes.key_values[i, 0], k], dim=2)
                v = torch.cat([prefixes.key_values[i, 1], v], dim=2)
            layers.append((k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale, enable_gqa=True)

        real = attention_mask.reshape(-1).nonzero().squeeze(1)  # (n,) the tokens that are not padding
        ends = attention_mask.long().sum(dim=1).cumsum(dim=0) - 1  # each row's last token among them
        if len(real) == attention_mask.numel():
            real = None
        return _Part(input_ids, token_positions(attention_mask, prefixes.lengths), attend, real, ends)

    def _decode_part(self, decode: Decode):
        tokens, attention_mask, positions, cache = decode
        on_cpu = tokens.device.type == "cpu"
        bias = additive_mask(attention_mask.bool()[:, None, None, :], torch.float32 if on_cpu else self.embed.dtype)

        def attend(i, q, k, v):
            k, v = cache.layers[i].update(k, v)
            if on_cpu:
                return _one_query_attention(q, k, v, bias, self.scale)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale, enable_gqa=True)

        return _Part(tokens, positions, attend, None, torch.arange(tokens.shape[0], device=tokens.device))

    def _forward(self, parts: list[_Part]) -> torch.Tensor:
        """-> the hidden state of each row's last token (sum of B, hidden).

        Every part's real tokens go through each linear layer together, packed: padding costs
        no matmul work (a chunk that splits prompts of different lengths is mostly padding).
        Attention runs per part on the padded (B, heads, T, D) layout, padding slots zero.
        """
        ids, positions, sizes = [], [], []
        for part in parts:
            flat_ids, flat_at = part.input_ids.reshape(-1), part.positions.reshape(-1)
            if part.real is not None:
                flat_ids, flat_at = flat_ids[part.real], flat_at[part.real]
            ids.append(flat_ids)
            positions.append(flat_at)
            sizes.append(len(flat_ids))
        hidden = F.embedding(torch.cat(ids), self.embed)  # (N, hidden): real tokens of every part
        cos, sin = (t[0] for t in self.rotary(hidden, position_ids=torch.cat(positions).unsqueeze(0)))  # (N, D)
        tokens = hidden.shape[0]
        for i, layer in enumerate(self.layers):
            x = rms_norm(hidden, *layer.norm_in)  # (N, hidden)
            qk, v = layer.qkv(x).split([layer.q_size + layer.kv_size, layer.kv_size], dim=-1)
            # rotate queries and keys in one pass: they are adjacent heads of the qkv output
            qk = rotate(qk.view(tokens, -1, self.head_dim), cos.unsqueeze(1), sin.unsqueeze(1))  # (N, H + H_kv, D)
            v = v.view(tokens, -1, self.head_dim)
            outs = []
            for part, part_qk, part_v in zip(parts, qk.split(sizes), v.split(sizes), strict=True):
                batch, length = part.input_ids.shape
                q, k, v_part = (
                    padded_heads(t, part.real, batch, length)
                    for t in (part_qk[:, : self.heads], part_qk[:, self.heads :], part_v)
                )
                out = part.attend(i, q, k, v_part).transpose(1, 2).reshape(batch * length, -1)  # (B * T, H * D)
                outs.append(out if part.real is None else out.index_select(0, part.real))
            hidden = hidden + layer.o(torch.cat(outs) if len(outs) > 1 else outs[0])
            x = rms_norm(hidden, *layer.norm_post)
            hidden = hidden + layer.down(F.silu(layer.gate(x)) * layer.up(x))
        # offsets as Python ints: a tensor of them would be a host-to-device copy, which on a GPU
        # waits for the stream (and cannot be captured in a CUDA graph)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        ends = torch.cat([part.ends + offset for part, offset in zip(parts, offsets, strict=True)])
        return hidden.index_select(0, ends)  # (sum B, hidden)

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.head(rms_norm(last, *self.norm))
