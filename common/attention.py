"""The one place that hands prefixes to a transformers model.

Everything version-sensitive about injecting a prefix lives here: the Cache object,
the keyword that carries it, the extended attention mask and the position ids.

Per batch row b the model sees
    keys   = [pad slots | prefix_b (P_b) | left padding | tokens]
    mask   = [0 ... 0   | 1 ... 1        | 0 ... 0      | 1 ... 1]
    positions of tokens = P_b, P_b + 1, ...   (after the prefix, as PEFT places them)
so every row's logits equal what that row gets alone, whatever its neighbours'
prefix lengths and paddings. Prefixes of different lengths are padded on the left
with masked zero slots up to the batch's longest prefix.

Tested with transformers 5.24 (pyproject pins the range): the cache keyword there is
``cache`` (``past_key_values`` is deprecated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .errors import ShapeError

CACHE_KWARG = "cache"  # transformers < 5.24 called it past_key_values
# a running batch's leading columns that are padding in every row go once they are this share
# of its width (drop_rows), so its width stays below PADDING_TRIM / (PADDING_TRIM - 1) x its widest row's
PADDING_TRIM = 8
HEADROOM = 64  # slots a running batch's cache gets beyond its width when it is built


@dataclass
class PrefixBatch:
    """Prefixes of one batch, stacked and left-padded to the longest."""

    key_values: torch.Tensor | None  # (L, 2, B, H, Pmax, D); None when no row has a prefix
    mask: torch.Tensor  # (B, Pmax) long: 1 = real prefix slot, 0 = padding slot
    lengths: torch.Tensor  # (B,) long: P_b, the real prefix length of each row

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    def cache(self) -> DynamicCache | None:
        """A fresh DynamicCache holding the prefixes (the model appends to it, so never reuse one)."""
        if self.key_values is None:
            return None
        return DynamicCache([(kv[0], kv[1]) for kv in self.key_values])  # per layer (B, H, Pmax, D)


def stack_prefixes(rows: Sequence[torch.Tensor | None], dtype: torch.dtype, device: torch.device | str) -> PrefixBatch:
    """Stack per-row prefixes (each (L, 2, H, P_b, D) or None for no prefix) into one batch."""
    batch = len(rows)
    present = [kv for kv in rows if kv is not None]
    lengths = torch.tensor([0 if kv is None else kv.shape[3] for kv in rows], dtype=torch.long, device=device)
    if not present:
        return PrefixBatch(None, torch.zeros(batch, 0, dtype=torch.long, device=device), lengths)
    first = present[0]
    for kv in present:
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[:3] != first.shape[:3] or kv.shape[4] != first.shape[4]:
            raise ShapeError(
                f"batch prefixes must all be (L, 2, H, P, D) for the same base; got {tuple(first.shape)} "
                f"and {tuple(kv.shape)}"
            )
    layers, _, heads, _, dim = first.shape
    p_max = int(lengths.max())
    slots = torch.arange(p_max, device=device)
    mask = (slots.unsqueeze(0) >= (p_max - lengths).unsqueeze(1)).long()  # (B, Pmax), real slots on the right
    if all(kv is not None and kv.shape[3] == p_max for kv in rows):
        stacked = torch.stack([kv.to(dtype=dtype, device=device) for kv in rows], dim=2)  # keeps autograd
    else:
        parts = []
        for kv in rows:
            pad = p_max - (0 if kv is None else kv.shape[3])
            zeros = torch.zeros(layers, 2, heads, pad, dim, dtype=dtype, device=device)
            parts.append(zeros if kv is None else torch.cat([zeros, kv.to(dtype=dtype, device=device)], dim=3))
        stacked = torch.stack(parts, dim=2)  # (L, 2, B, H, Pmax, D)
    return PrefixBatch(stacked, mask, lengths)


def token_positions(attention_mask: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids: real tokens count up from the row's prefix length; pads get 0..

    Left padding therefore does not shift a row's positions (PEFT without explicit
    position ids shifts them, which changes the logits).
    """
    counted = attention_mask.long().cumsum(dim=1) - 1  # (B, T), 0 at the first real token
    return (counted.clamp(min=0) + prefix_lengths.unsqueeze(1)).long()


def padded_heads(packed: torch.Tensor, real: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Packed tokens (n, heads, D) back in the (B, heads, T, D) layout attention reads; padding
    slots are zeros. `real`: each packed token's cell among the B * T (None: no padding)."""
    if real is not None:
        full = packed.new_zeros(batch * length, *packed.shape[1:])
        packed = full.index_copy_(0, real, packed)
    return packed.view(batch, length, *packed.shape[1:]).transpose(1, 2)


def prefixed_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefixes: PrefixBatch,
) -> dict:
    """Keyword arguments for a model forward over `input_ids` (B, T) behind `prefixes`."""
    if input_ids.shape != attention_mask.shape:
        raise ShapeError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if prefixes.mask.shape[0] != input_ids.shape[0]:
        raise ShapeError(f"{prefixes.mask.shape[0]} prefixes for a batch of {input_ids.shape[0]} rows")
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.cat([prefixes.mask, attention_mask.long()], dim=1),  # (B, Pmax + T)
        "position_ids": token_positions(attention_mask, prefixes.lengths),  # (B, T)
    }
    cache = prefixes.cache()
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    return kwargs


def forward_with_prefixes(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefixes: PrefixBatch,
    **model_kwargs,
):
    """Run the causal LM with one prefix per row; returns the model's output (logits, cache)."""
    return model(**prefixed_inputs(input_ids, attention_mask, prefixes), **model_kwargs)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefixes: PrefixBatch):
    """Prompt behind prefixes -> (next-token logits (B, V), cache holding prefix + prompt).

    Only the last position goes through the LM head, as a contiguous (B, hidden) matrix:
    transformers' `logits_to_keep=1` hands the head a strided (B, 1, hidden) slice, for which
    torch's bfloat16 CPU matmul copies the head weight once per row (seconds at B=64).
    """
    decoder = getattr(model, model.base_model_prefix)
    out = decoder(**prefixed_inputs(input_ids, attention_mask, prefixes), use_cache=True)
    last = out.last_hidden_state[:, -1, :].contiguous()  # (B, hidden)
    return model.get_output_embeddings()(last), getattr(out, CACHE_KWARG)


def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache):
    """One new token per row -> next-token logits (B, V); `cache` is appended in place.

    tokens and positions: (B, 1); attention_mask: (B, T + 1), the cache's mask plus the new slot.
    """
    decoder = getattr(model, model.base_model_prefix)
    out = decoder(
        input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True, **{CACHE_KWARG: cache}
    )
    return model.get_output_embeddings()(out.last_hidden_state[:, -1, :].contiguous()), getattr(out, CACHE_KWARG)


def hidden_with_prefixes(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefixes: PrefixBatch):
    """Last hidden states (B, T, hidden) without the LM head, so a loss can project only the rows it needs."""
    decoder = getattr(model, model.base_model_prefix)
    return decoder(**prefixed_inputs(input_ids, attention_mask, prefixes), use_cache=False).last_hidden_state


@torch.no_grad()
def text_key_values(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The base's own keys and values for `input_ids` (1, P), as a prefix (L, 2, H, P, D)."""
    out = model(input_ids=input_ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # each (2, H, P, D)
    return torch.stack(layers)


# ------------------------------------------------------------------ running batches (serving)
# A running batch keeps, per layer, keys/values (B, H, T, D) where each row is
# [masked left padding | prefix | prompt | generated] and a mask (B, T) marking real
# slots. Rows join and leave between decode steps; these helpers keep the cache in that
# layout so that every row still sees exactly its own keys.


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (B, H, T, D), of a DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class GrowingLayer(DynamicLayer):
    """A layer's keys/values in a buffer with spare room for rows and slots: a new token, a
    joining row and a leaving row are all written in place.

    DynamicLayer concatenates on every step, copying the whole cache each time (a large
    share of a batched decode step); here the buffer doubles when full, and
    `keys` / `values` are views of its first `rows` rows and first `length` slots.
    """

    def __init__(
        self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int, rows: int, budget: int | None = None
    ) -> None:
        super().__init__()
        self._keys, self._values = key_buffer, value_buffer  # (row capacity, H, slot capacity, D)
        self.length, self.rows, self.device, self.is_initialized = length, rows, key_buffer.device, True
        self.budget = budget  # row capacity x slot capacity stays within it where rows x slots do (None: no bound)
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[: self.rows, :, : self.length]
        self.values = self._values[: self.rows, :, : self.length]

    @property
    def row_capacity(self) -> int:
        return self._keys.shape[0]

    @property
    def slot_capacity(self) -> int:
        return self._keys.shape[2]

    def reserve(self, slots: int) -> None:
        """Room for at least `slots` slots: the buffer doubles (a copy) when it has fewer; within a
        budget, it grows less, and gives up spare rows, before it passes the budget."""
        if slots > self._keys.shape[2]:
            capacity, row_capacity = max(2 * self._keys.shape[2], slots), self.row_capacity
            if self.budget is not None:
                capacity = max(slots, min(capacity, self.budget // max(1, self.rows)))
                row_capacity = max(self.rows, min(row_capacity, self.budget // capacity))
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                grown = old.new_empty(row_capacity, old.shape[1], capacity, old.shape[3])
                grown[: self.rows, :, : self.length] = old[: self.rows, :, : self.length]
                setattr(self, name, grown)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        self.reserve(self.length + new)
        self._keys[: self.rows, :, self.length : self.length + new] = key_states
        self._values[: self.rows, :, self.length : self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows (n, H, w, D) whose slots end where the others' do; their first
        `length - w` slots are zero (masked, finite). Needs room for n more rows and w <= length."""
        count, width = keys.shape[0], keys.shape[2]
        for buffer, source in ((self._keys, keys), (self._values, values)):
            target = buffer[self.rows : self.rows + count]
            target[:, :, : self.length - width].zero_()
            target[:, :, self.length - width : self.length] = source
        self.rows += count
        self._expose()

    def move_rows(self, sources: torch.Tensor, targets: torch.Tensor, rows: int) -> None:
        """Copy rows `sources` onto rows `targets` (disjoint), then keep the first `rows`."""
        if len(sources):
            for buffer in (self._keys, self._values):
                buffer[targets, :, : self.length] = buffer[sources, :, : self.length]
        self.rows = rows
        self._expose()

    def get_seq_length(self) -> int:
        return self.length


def cache_from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]], headroom: int = HEADROOM) -> Cache:
    """A cache holding `layers` (per layer (keys, values), each (B, H, T, D)) with room to grow."""
    return batch_cache([(layers, None, None)], headroom)[0]


def batch_cache(
    parts, headroom: int = HEADROOM, row_capacity: int = 0, budget: int | None = None
) -> tuple[Cache, torch.Tensor | None]:
    """A running batch's cache, built in one copy from groups of rows stacked in order.

    parts: each (layers: per layer (keys, values) (B_i, H, T_i, D), mask (B_i, T_i) or None,
    rows: indices of the group's rows to take, or None for all). With masks, columns that are
    padding in every taken row of a group are dropped, and each group is left-padded with
    masked zero slots up to the widest. Room is left for `headroom` more slots and up to
    `row_capacity` rows in all, less of both where rows x slots would pass `budget` (row-slots;
    never fewer than the rows and slots taken). -> (the cache, its mask (B, T) or None).
    """
    groups = []
    for layers, mask, rows in parts:
        start = 0
        if mask is not None:
            mask = mask if rows is None else mask.index_select(0, rows)
            start = _padding_columns(mask)
        columns = mask.shape[1] if mask is not None else layers[0][0].shape[2]
        groups.append((layers, mask, rows, start, columns - start))
    width = max(group[4] for group in groups)
    masks = [
        torch.cat([mask.new_zeros(mask.shape[0], width - kept), mask[:, start:]], dim=1)
        for _, mask, _, start, kept in groups
        if mask is not None
    ]
    sizes = [
        len(rows) if rows is not None else mask.shape[0] if mask is not None else layers[0][0].shape[0]
        for layers, mask, rows, _, _ in groups
    ]
    taken = sum(sizes)
    slots, capacity = width + headroom, max(taken, row_capacity)
    if budget is not None:
        slots = max(width, min(slots, budget // max(1, taken)))
        capacity = max(taken, min(capacity, budget // max(1, slots)))
    cache = []
    for i in range(len(groups[0][0])):
        sources = [layers[i] for layers, _, _, _, _ in groups]  # read once: a PackedRows layer is a copy
        _, heads, _, dim = sources[0][0].shape
        buffers = [sources[0][0].new_empty(capacity, heads, slots, dim) for _ in range(2)]
        offset = 0
        for (_, _, rows, start, kept), size, layer in zip(groups, sizes, sources, strict=True):
            for buffer, source in zip(buffers, layer, strict=True):
                if rows is not None:
                    source = source.index_select(0, rows)
                buffer[offset : offset + size, :, : width - kept].zero_()  # masked slots: finite
                buffer[offset : offset + size, :, width - kept : width] = source[:, :, start:]
            offset += size
        cache.append(GrowingLayer(*buffers, width, taken, budget))
    return Cache(layers=cache), (torch.cat(masks) if masks else None)


def join_rows(
    cache: Cache | None,
    mask,
    layers,
    new_mask: torch.Tensor,
    rows: torch.Tensor,
    max_rows: int,
    budget: int | None = None,
):
    """A running batch (cache, mask) with rows `rows` of a prefill's (layers, new_mask) appended,
    each packed first (pack_rows).

    The joiners are written into the batch's spare rows (no copy of the running rows); only
    when they need more rows than are free, or more slots than the batch has, is the cache
    built anew in one copy, with room for twice its rows (at most `max_rows`, and within
    `budget` row-slots: see batch_cache). -> (cache, mask (B, T)).
    """
    layers, new_mask = pack_rows(layers, new_mask, rows)
    count, width = new_mask.shape
    first = None if cache is None else cache.layers[0]
    if first is None or width > first.length or first.rows + count > first.row_capacity:
        running = [] if cache is None else [(cache_layers(cache), mask, None)]
        total = count + (0 if mask is None else mask.shape[0])
        return batch_cache([*running, (layers, new_mask, None)], row_capacity=min(max_rows, 2 * total), budget=budget)
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        layer.add_rows(keys, values)
    padding = new_mask.new_zeros(count, mask.shape[1] - width)
    return cache, torch.cat([mask, torch.cat([padding, new_mask], dim=1)])


def pack_rows(layers, mask: torch.Tensor, rows: torch.Tensor) -> tuple[PackedRows, torch.Tensor]:
    """Rows `rows` of a prefill's (layers, mask), each row's real slots moved together to its
    right end, in order. In a chunk a joiner's context (prefix and earlier prompt) is padded to
    the chunk's longest and its last piece to the longest piece: left as it is, a long context
    with a short piece made the row nearly twice as wide as its tokens, past the KV budget.
    -> (the layers, each packed when read, (n, H, w, D)), mask (n, w)), w the most real slots of a row."""
    mask = mask.index_select(0, rows)
    width = int(mask.sum(dim=1).max())
    # a stable sort of 0/1 puts each row's padding first and its real slots after, both in order
    order = torch.sort(mask.long(), dim=1, stable=True).indices[:, mask.shape[1] - width :]  # (n, w)
    return PackedRows(layers, rows, order), mask.gather(1, order)


class PackedRows(Sequence):
    """Per layer (keys, values) of some rows, gathered as `order` says when the layer is read:
    one layer's copy at a time, where packing every layer first held a whole copy more."""

    def __init__(self, layers, rows: torch.Tensor, order: torch.Tensor) -> None:
        self.layers, self.rows, self.order = layers, rows, order

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.layers[i]
        index = self.order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        return keys.index_select(0, self.rows).gather(2, index), values.index_select(0, self.rows).gather(2, index)


def drop_rows(cache: Cache, mask: torch.Tensor, keep: list[int]) -> tuple[Cache, torch.Tensor, list[int]]:
    """Only rows `keep` (ascending) of a running batch stay, in place: each gap left by a row
    that goes is filled by one of the last kept rows (one row's copy, not the batch's).
    When the columns that are padding in every kept row reach 1/PADDING_TRIM of the width, they go
    (one copy of the cache): each decode step's attention reads every column, and in a batch
    that rows keep joining and leaving such columns pile up by one a step.
    -> (cache, mask, order): order[i] = the old index of the row now at i."""
    stay, kept = len(keep), set(keep)
    gaps = [i for i in range(stay) if i not in kept]
    movers = [i for i in keep if i >= stay]  # as many as there are gaps
    order = list(range(stay))
    for gap, mover in zip(gaps, movers, strict=True):
        order[gap] = mover
    device = mask.device
    sources, targets = torch.tensor(movers, device=device), torch.tensor(gaps, device=device)
    for layer in cache.layers:
        layer.move_rows(sources, targets, stay)
    mask = mask.index_select(0, torch.tensor(order, device=device))
    start = _padding_columns(mask)
    if start and PADDING_TRIM * start >= mask.shape[1]:
        first = cache.layers[0]
        cache, mask = batch_cache(
            [(cache_layers(cache), mask, None)], row_capacity=first.row_capacity, budget=first.budget
        )
    return cache, mask, order


def _padding_columns(mask: torch.Tensor) -> int:
    """How many leading columns of a batch mask (B, T) are padding in every row."""
    used = mask.any(dim=0).nonzero()
    return int(used[0]) if len(used) else mask.shape[1]


def row_key_values(layers, row: int, slots: slice | torch.Tensor) -> torch.Tensor:
    """One batch row's keys and values at `slots` (a slice or index tensor) as (L, 2, H, n, D), a copy."""
    return torch.stack([torch.stack([keys[row][:, slots], values[row][:, slots]]) for keys, values in layers])


def rewind(cache: Cache, lengths: list[int]) -> None:
    """Undo appends to a cache of GrowingLayers: each layer back to its slot count in `lengths`."""
    for layer, length in zip(cache.layers, lengths, strict=True):
        layer.length = length
        layer._expose()
