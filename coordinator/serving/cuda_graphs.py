"""Decode steps replayed from CUDA graphs, on a GPU.

There a decode step of the lean forward is Python launching ~30 layers of kernels, about
as long for 1 row as for 64 (H100, SmolLM2-135M's shape, bf16: 17-25 ms eager), while the
GPU's own work is ~2 ms: the same step captured once and replayed took 2.0-2.3 ms, with
equal logits (README, "Serving on a GPU"). The engine's thread also holds the interpreter
for all of an eager step, which HTTP's thread then waits for.

A graph replays fixed shapes at fixed addresses, so the step it captures is written for them
(as vLLM's): rows padded up to a bucket (1, 2, 4, 8, 16, 32, 64, ..., never past the cache's
row capacity), attention over every slot of the cache's buffer with the slots past the
batch's length masked, and the new token's keys and values written at a slot index held in a
tensor. A graph is captured the first time a bucket is met on a set of cache buffers and
dropped when the batch's cache is rebuilt or grows (new buffers); capturing one costs about
two eager steps. Steps that carry a prefill chunk run eagerly (their shapes change every
step). A new graph's first replay is checked against the eager run of the same step; where
capturing fails or they disagree, decode steps run eagerly from then on, with a warning.

`capture=False` runs the same fixed-shape step without a graph: the tests check on a CPU
that it computes what the eager step does.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch

from .fast_llama import Decode, FastLlama

log = logging.getLogger(__name__)


def bucket_for(rows: int, row_capacity: int) -> int:
    """The padded row count a decode step of `rows` rows runs at: the next power of two, within the capacity."""
    return min(1 << (rows - 1).bit_length(), row_capacity)


class _Layers(NamedTuple):
    layers: list  # _SlotWriter per layer: what FastLlama's decode attends through (`cache.layers[i].update`)


class _SlotWriter:
    """A cache layer's whole buffer (bucket rows, every slot): writes the new token's keys and
    values at the slot `slot` holds, and attends over every slot."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> None:
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        self.keys.index_copy_(2, self.slot, key_states)
        self.values.index_copy_(2, self.slot, value_states)
        return self.keys, self.values


class _FixedStep:
    """One bucket's decode step over one set of cache buffers, with inputs in tensors of its own."""

    def __init__(self, fast: FastLlama, cache_layers, bucket: int, capture: bool, pool, stream) -> None:
        first = cache_layers[0]
        device = first._keys.device
        self.fast, self.bucket = fast, bucket
        self.tokens = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(bucket, first.slot_capacity, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        writers = [_SlotWriter(layer._keys[:bucket], layer._values[:bucket], self.slot) for layer in cache_layers]
        self.decode = Decode(self.tokens, self.mask, self.positions, _Layers(writers))
        self.capture, self.pool, self.stream = capture, pool, stream
        self.graph = None
        self.logits: torch.Tensor | None = None

    def run(self, decode: Decode) -> torch.Tensor:
        """-> next-token logits (rows, V) of `decode`'s rows; writes their new slot into the cache buffers."""
        rows, width = decode.attention_mask.shape  # width: the cache's length + the new slot
        self.tokens[:rows].copy_(decode.tokens)
        self.positions[:rows].copy_(decode.positions)
        # slots at and past `width` stay 0 (masked): the mask starts at zeros and the cache's width
        # only grows on these buffers (a cache rebuilt narrower comes with new buffers, a new step)
        self.mask[:rows, :width].copy_(decode.attention_mask)
        self.mask[rows:, width - 1] = 1  # padding rows see at least their own new slot: finite, then dropped
        self.slot.fill_(width - 1)
        if not self.capture:
            return self._step()[:rows]
        if self.graph is None:  # the warm-up runs this step eagerly; the replay writes the same values again
            eager = self._capture()[:rows]
            self.graph.replay()
            if not agree(self.logits[:rows], eager):
                raise RuntimeError("a replayed CUDA graph disagreed with the eager step it captured")
            return eager
        self.graph.replay()
        return self.logits[:rows].clone()  # the next replay overwrites the graph's output

    def _step(self) -> torch.Tensor:
        return self.fast.step(None, self.decode)[1]

    def _capture(self) -> torch.Tensor:
        """Capture this bucket's graph (self.graph, output self.logits) -> the step's logits, run eagerly."""
        side, current = self.stream, torch.cuda.current_stream()
        side.wait_stream(current)
        # on a stream of our own, entered here: a capture that fails (torch.cuda.graph's exit raises
        # before it restores the stream) still leaves the engine's thread on its own stream after
        with torch.cuda.stream(side):
            eager = self._step()  # lazy initialisation (cuBLAS handles, workspaces) stays out of the graph
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (unlocking prefixes, copying them to the GPU) go on meanwhile
            with torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                self.logits = self._step()
        current.wait_stream(side)
        self.graph = graph
        return eager


def agree(replayed: torch.Tensor, eager: torch.Tensor) -> bool:
    """Whether a graph's first replay computed what the eager run of its step did: the same kernels
    on the same inputs, so any difference beyond rounding means it read or wrote the wrong memory."""
    replayed, eager = replayed.float(), eager.float()
    scale = 1.0 + float(eager.abs().max())
    return bool(torch.isfinite(replayed).all()) and float((replayed - eager).abs().max()) <= 1e-2 * scale


class GraphedDecode:
    """FastLlama with pure decode steps run as fixed-shape steps, replayed from CUDA graphs."""

    def __init__(self, fast: FastLlama, capture: bool = True) -> None:
        self.fast, self.capture = fast, capture
        self.device = fast.embed.device
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.stream = torch.cuda.Stream(device=self.device) if capture else None
        self._steps: dict[int, _FixedStep] = {}  # by bucket, for the buffers in `_buffers`
        self._buffers: tuple | None = None
        self.padded_steps = 0  # steps that ran with padding rows
        self.eager_reason: str | None = None  # why graphs turned off (a failed or disagreeing capture)

    def prefill(self, input_ids, attention_mask, prefixes):
        return self.fast.prefill(input_ids, attention_mask, prefixes)

    def decode_step(self, tokens, attention_mask, positions, cache) -> torch.Tensor:
        return self.step(None, Decode(tokens, attention_mask, positions, cache))[1]

    def step(self, chunk, decode: Decode | None):
        """As FastLlama.step; a decode step without a chunk runs from its bucket's graph."""
        if chunk is not None or decode is None or self.eager_reason is not None:
            result = self.fast.step(chunk, decode)
            if decode is not None and _buffers_of(decode.cache.layers) != self._buffers:
                self.release()  # the batch's cache was rebuilt or grew: the graphs' old buffers go now
            return result
        if not self.capture:
            return None, self._fixed_step(decode)
        try:
            # streams, captures and syncs act on the current device (a CPU forward: the tests' stand-in)
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                return None, self._fixed_step(decode)
        except Exception as error:  # never the request's fault: run eagerly from now on
            self.eager_reason = f"CUDA graphs are off: {error}"
            log.warning("decode steps run eagerly: %s", self.eager_reason)
            self.release()
            return self.fast.step(None, decode)  # rewrites the same new slot, as the failed try may have

    def release(self) -> None:
        """Drop the graphs and with them the cache buffers they hold (the batch emptied or failed)."""
        self._steps.clear()
        self._buffers = None

    def _fixed_step(self, decode: Decode) -> torch.Tensor:
        layers = decode.cache.layers
        length, rows = layers[0].length, decode.tokens.shape[0]
        if decode.attention_mask.shape[1] != length + 1 or rows != layers[0].rows:
            raise ValueError("a decode step's mask must cover the cache's rows and slots plus the new slot")
        for layer in layers:
            layer.reserve(length + 1)
        buffers = _buffers_of(layers)
        if buffers != self._buffers:  # a rebuilt or grown cache: the graphs of the old buffers go
            self.release()
            self._buffers = buffers
            for layer in layers:  # slots never written read as zeros (new_empty may hold NaN), masked anyway
                for buffer in (layer._keys, layer._values):
                    buffer[layer.rows :].zero_()
                    buffer[:, :, length:].zero_()
        bucket = bucket_for(rows, layers[0].row_capacity)
        self.padded_steps += bucket > rows
        step = self._steps.get(bucket)
        if step is None:
            step = self._steps[bucket] = _FixedStep(self.fast, layers, bucket, self.capture, self.pool, self.stream)
        logits = step.run(decode)
        for layer in layers:
            layer.length += 1
            layer._expose()
        return logits


def _buffers_of(layers) -> tuple:
    """Which buffers a cache's layers hold: graphs captured over other buffers are stale."""
    return tuple((layer._keys.data_ptr(), layer._values.data_ptr(), *layer._keys.shape) for layer in layers)
