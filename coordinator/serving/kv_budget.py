"""How much KV the running batch may hold, and which requests fit in it.

The batch keeps its rows' keys and values in one padded rectangle, rows x slots (see
common/attention.py), so it holds rows x its widest row's slots: a long prompt among short
chat turns makes every row as wide as it. Unbounded, one 3,000-token prompt beside 63 short
prompts took a server of the built-in base (bfloat16) past a 10 GiB memory limit, where the
kernel killed it and every request it held. Here a request joins only while every row could
reach its end (prefix + prompt + max_tokens) within the budget; else it waits for rows to
leave (first in turn first: no smaller request passes it). A request that would not fit
even alone is refused when it arrives (engine.py). The cache's buffers stay within the
budget as they grow (GrowingLayer). What a step holds beside the batch (a prefill chunk's
KV, the copy made while rows join) comes on top: see AUTO_SHARE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from fedprefix.common.attention import HEADROOM, PADDING_TRIM
from fedprefix.common.prefix import PrefixSpec
from fedprefix.common.resources import available_memory

from .requests import RequestHandle

MIB = 1 << 20
# Of the memory free once the base and the prefix and prompt caches are counted: the batch's
# KV may take a fifth, as a step that joins rows holds more for a moment (the chunk's padded
# KV, the joiners' contexts, the old and the new rectangle): 3.3x the budget at the peak of
# the run above, so about two thirds of the free memory at the peak.
AUTO_SHARE = 0.2
FALLBACK_BYTES = 2 << 30  # where free memory cannot be read (neither /proc nor psutil gave a figure)


def slot_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of one row's keys and values at one position, over all layers: one prefix token's."""
    return PrefixSpec.from_model_config(config, 1).flat_dim * torch.empty((), dtype=dtype).element_size()


def auto_budget_bytes(device: torch.device, held_elsewhere: int) -> int | None:
    """AUTO_SHARE of the memory free on `device`, less `held_elsewhere` (the caches' bounds);
    None where the free memory cannot be read."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    return None if free is None else max(0, int((free - held_elsewhere) * AUTO_SHARE))


def reach(handle: RequestHandle) -> int:
    """The most slots a request's row takes: its prefix, prompt and every token it may generate."""
    prefix = 0 if handle.prefix is None else handle.prefix.shape[3]
    return prefix + len(handle.prompt_ids) + handle.request.params.max_new_tokens


@dataclass(frozen=True)
class KvBudget:
    """The running batch's KV budget, in row-slots (one row's KV at one position)."""

    slots: int
    slot_bytes: int

    @classmethod
    def of_bytes(cls, budget: int, slot_bytes: int) -> KvBudget:
        return cls(budget // slot_bytes, slot_bytes)

    @property
    def bytes(self) -> int:
        return self.slots * self.slot_bytes

    @staticmethod
    def row_slots(widest: int) -> int:
        """Slots per row of a batch whose widest row reaches `widest`: its width stays below
        PADDING_TRIM / (PADDING_TRIM - 1) of that, plus a rebuilt cache's headroom."""
        return math.ceil(widest * PADDING_TRIM / (PADDING_TRIM - 1)) + HEADROOM

    def fits(self, rows: int, widest: int) -> bool:
        """Whether `rows` rows fit when the widest may reach `widest` slots."""
        return rows * self.row_slots(widest) <= self.slots

    def longest_alone(self) -> int:
        """The widest reach one row may have in this budget (0: none)."""
        room = self.slots - HEADROOM
        return max(0, room * (PADDING_TRIM - 1) // PADDING_TRIM)

    def describe(self) -> str:
        return f"{self.bytes / MIB:,.0f} MiB"
