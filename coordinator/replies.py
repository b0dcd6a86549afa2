"""Every reply a node sends is checked whole and alone before it can touch the shared prefix.

A node may be broken or hostile: its reply may carry an error, lists where scalars
belong, NaN or inf, an absurd example count, arrays whose bytes disagree with their
declared shape, other dtypes or names. Each check here returns the reason a reply is
rejected (None: accepted); anything that raises while checking rejects that reply with
the exception as its reason. Nothing one node sends can end the run.

What the checks cannot see (a well-formed but poisoned update) is bounded afterwards:
`bound_updates` clips each accepted update's norm to a multiple of the round's median,
and robust aggregators (Krum, trimmed mean, median) can replace the average.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping

import numpy as np
from fedprefix.common.config import FederationConfig
from fedprefix.common.protocol import (
    ARRAYS,
    DP_WEIGHT,
    EVAL_METRICS,
    EVAL_PARTS,
    METRICS,
    NUM_EXAMPLES,
    STEPS,
    TRAIN_LOSS,
    TRAIN_METRICS,
    TRAIN_SECONDS,
    eval_loss_key,
    unpack_shared,
)
from flwr.app import Array, ArrayRecord, Message

Arrays = dict[str, np.ndarray]  # the shared prefix's tensors by name, float32


def _guarded(check):
    """Run a check; an exception while checking is itself the reason to reject."""

    def guarded(*args, **kwargs) -> str | None:
        try:
            return check(*args, **kwargs)
        except Exception as exc:  # a reply that breaks a check is malformed, never fatal
            return f"malformed reply: {type(exc).__name__}: {exc}"

    return guarded


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_REASON = 300  # characters of a node's error kept in the round record
MAX_TRAIN_SECONDS = 1e6  # a node's reported local training time (11 days): beyond it, not a time
# A loss per completion token (cross-entropy, nats): ln of a vocabulary is ~12, and a prefix
# gone wrong rarely passes 100; beyond this bound a value is no loss, only a lever on the record.
MAX_LOSS = 1e3
# an update a node clipped to the bound measures up to a few float32 roundings above it here
NORM_ROUNDING = 1e-5
LOSSES = (TRAIN_LOSS, *(eval_loss_key(name) for name in EVAL_PARTS))


def node_error(msg: Message) -> str:
    """A node's error reason as one plain line: no terminal colours, bounded length (its head,
    which names the error's kind, and its tail, where a wrapped exception's own message is)."""
    text = " ".join(_ANSI.sub("", str(msg.error.reason)).split())
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON // 3] + " … " + text[-(MAX_REASON - MAX_REASON // 3) :]
    return "node error: " + text


def _metrics_problem(msg: Message, required: tuple[str, ...], config: FederationConfig) -> str | None:
    if msg.has_error():
        return node_error(msg)
    if set(msg.content.config_records):
        return "a reply must not carry config records"
    if set(msg.content.metric_records) != {METRICS}:
        return f"expected exactly one MetricRecord named '{METRICS}', got {sorted(msg.content.metric_records)}"
    metrics = msg.content[METRICS]
    missing = [key for key in required if key not in metrics]
    if missing:
        return f"missing metrics {missing}"
    unexpected = sorted(set(metrics) - set(required))
    if unexpected:  # Flower refuses to aggregate replies whose keys differ: one such reply would void the round
        return f"unexpected metrics {unexpected[:5]}"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {key!r} must be a number, got {type(value).__name__}"
        if not math.isfinite(value):
            return f"metric {key!r} is {value}, not a finite number"
    seconds = metrics.get(TRAIN_SECONDS, 0.0)  # summed into the round's record: one node's value must fit
    if not 0 <= seconds <= MAX_TRAIN_SECONDS:
        return f"'{TRAIN_SECONDS}' = {seconds:g} is outside [0, {MAX_TRAIN_SECONDS:g}]"
    examples = metrics[NUM_EXAMPLES]
    # a count of rows: a fraction (1e-6) made honest nodes' weights 10^6 times a secure round's weight cap
    if examples != int(examples) or not 1 <= examples <= config.max_num_examples:
        return (
            f"'{NUM_EXAMPLES}' = {examples:g} is not a whole number in [1, {config.max_num_examples}] "
            "(run setting max-num-examples)"
        )
    for key in LOSSES:
        if key in metrics and not 0 <= metrics[key] <= MAX_LOSS:  # a negative one faked a personal gain
            return f"'{key}' = {metrics[key]:g} is outside [0, {MAX_LOSS:g}], not a loss per token"
    steps = metrics.get(STEPS, 0)
    if steps != int(steps) or not 0 <= steps <= config.local_steps:
        return f"'{STEPS}' = {steps:g} is not a whole number in [0, {config.local_steps}] (run setting local-steps)"
    return None


@_guarded
def train_reply_problem(
    msg: Message,
    config: FederationConfig,
    expected: Mapping[str, tuple[int, ...]],
    current: Arrays,
    sends_shared: bool | None = None,
) -> str | None:
    """Why a training reply must be rejected, or None to accept it.

    `sends_shared`: whether replies of this round carry the shared prefix (default: the mode's rule).
    """
    problem = _metrics_problem(msg, TRAIN_METRICS, config)
    if problem is not None:
        return problem
    if msg.content[METRICS][DP_WEIGHT] != 1.0:
        return f"'{DP_WEIGHT}' must be 1 (DP accounting needs equal weights), got {msg.content[METRICS][DP_WEIGHT]:g}"
    records = set(msg.content.array_records)
    if not (config.sends_shared if sends_shared is None else sends_shared):
        return "a personal-only round: the reply must not carry arrays" if records else None
    if records != {ARRAYS}:
        return f"expected exactly one ArrayRecord named '{ARRAYS}', got {sorted(records)}"
    received = unpack_shared(msg.content[ARRAYS], expected)  # names, decoded shapes, dtype, finiteness
    norm = update_norm({k: t.numpy() for k, t in received.items()}, current)
    if norm > config.max_update_norm * (1 + NORM_ROUNDING):
        return f"update norm {norm:.3g} exceeds the bound {config.max_update_norm:g} (run setting max-update-norm)"
    return None


@_guarded
def evaluate_reply_problem(msg: Message, config: FederationConfig) -> str | None:
    """Why an evaluation reply must be rejected, or None to accept it."""
    problem = _metrics_problem(msg, EVAL_METRICS, config)
    if problem is None and msg.content.array_records:
        return "an evaluation reply must not carry arrays"
    return problem


def update_norm(arrays: Arrays, current: Arrays) -> float:
    """L2 norm of `arrays - current` over all tensors, in float64."""
    return math.sqrt(sum(float(((arrays[k].astype(np.float64) - current[k]) ** 2).sum()) for k in current))


def median_weight(replies: list[Message]) -> float:
    """The (low) median num-examples of accepted replies: what weights are capped against."""
    return float(statistics.median_low([msg.content[METRICS][NUM_EXAMPLES] for msg in replies]))


def payload_bytes(message: Message) -> int:
    """Bytes a reply carries: array data (decoded numel x itemsize) + 8 per metric value."""
    total = 0
    for record in message.content.array_records.values():
        for array in record.values():
            try:
                total += array.numpy().nbytes
            except Exception:  # undecodable (a hostile reply): count its raw bytes
                total += len(array.data)
    for record in message.content.metric_records.values():
        total += sum(8 * (len(v) if isinstance(v, list) else 1) for v in record.values())
    return total


def bound_updates(replies: list[Message], current: Arrays, prefix: str, factor: float) -> dict[int, float]:
    """Clip every accepted update to `factor` x the round's (low) median update norm, and its
    weight (num-examples) to `factor` x the (low) median weight, in place.

    No single reply can then move the shared prefix further than its capped weight share
    of that bound. Returns {node id: norm scale applied} for the replies whose update was clipped.
    Not under DP: a bound taken from the other users' updates would let one user's data move
    everyone's, past what the noise is sized for (the node's fixed clipping bounds each there).
    """
    if factor <= 0 or len(replies) < 2:
        return {}
    weight_cap = factor * median_weight(replies)
    for msg in replies:
        if msg.content[METRICS][NUM_EXAMPLES] > weight_cap:
            msg.content[METRICS][NUM_EXAMPLES] = weight_cap
    deltas = []
    for msg in replies:
        arrays = {name.removeprefix(prefix): a.numpy() for name, a in msg.content[ARRAYS].items()}
        deltas.append({k: arrays[k].astype(np.float64) - current[k] for k in current})
    norms = [math.sqrt(sum(float((d**2).sum()) for d in delta.values())) for delta in deltas]
    # the low median: of two replies, the smaller (the mean of two lets either one set the bound)
    bound = factor * float(statistics.median_low(norms))
    clipped = {}
    for msg, delta, norm in zip(replies, deltas, norms, strict=True):
        if norm > bound:  # a bound of 0 (most updates did not move) holds the others still too
            scale = bound / norm
            msg.content[ARRAYS] = ArrayRecord(
                {prefix + k: Array((current[k] + scale * d).astype(np.float32)) for k, d in delta.items()}
            )
            clipped[msg.metadata.src_node_id] = scale
    return clipped


def all_finite(arrays: ArrayRecord | None) -> bool:
    """True when every value of an aggregate is finite (None: nothing to apply)."""
    return arrays is None or all(np.isfinite(a.numpy()).all() for a in arrays.values())
