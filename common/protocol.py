"""The contract between device, coordinator and server: names, wire format, stored parts.

Both sides of a federation and the serving engine import this file; no key written here
is written anywhere else.

Messages (Flower Message API). A node reads the *run settings* (FederationConfig) from
its own `context.run_config`, the run's configuration that Flower gives every app; a
message carries only what changes per round (`RoundSettings`, in the ConfigRecord
``config``) and the shared prefix (the ArrayRecord ``arrays``). A training reply carries
``arrays`` (shared modes) and the MetricRecord ``metrics`` with `TRAIN_METRICS`, the
same keys in every reply; an evaluation reply carries `EVAL_METRICS`.

Shared arrays on the wire are named ``shared.<tensor>`` after the shared Prefix's own
tensor names, float32. Nothing else ever goes on the wire: a personal prefix has no
wire name. The one exception in form, not in content: the last round of personal-init
"interpolate" runs Flower's SecAgg+, whose messages are legacy FitIns/FitRes records
(client/secure.py, coordinator/secure_round.py); a node's update leaves only masked, and a
message with train-parts FINALIZE then brings the round's shared prefix.

Stored parts: a user's personal prefix is stored under the user id, the shared prefix
beside it under `shared_store_id(user_id)`; a row's prefix is [shared ; personal]
(`row_prefix`). The init-text rule makes the round-0 shared prefix the same on every
node and at the coordinator without any communication.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import ShapeError

if TYPE_CHECKING:
    import torch

# torch, the prefix and the store are imported where used: every message a Deployment Engine
# node gets starts a process that imports this file, and most need none of them (client/app.py).

# ------------------------------------------------------------------ message content names
ARRAYS = "arrays"  # ArrayRecord: the shared prefix, both directions
METRICS = "metrics"  # MetricRecord: a node's reply metrics
CONFIG = "config"  # ConfigRecord: the round's settings, coordinator -> node

# ------------------------------------------------------------------ metric keys
NUM_EXAMPLES = "num-examples"  # the weight FedAvg reads
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
STEPS = "steps"
DP_WEIGHT = "dp-weight"  # 1 in every reply: DP accounting needs equal client weights
TRAIN_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, STEPS, DP_WEIGHT)
EVAL_PARTS = {"base": "none", "shared": "shared", "personal": "all"}  # reported name -> Personalizer parts


def eval_loss_key(name: str) -> str:
    """The metric key of held-out loss with `name` in EVAL_PARTS ('base', 'shared', 'personal')."""
    return f"eval-loss-{name}"


EVAL_METRICS = (NUM_EXAMPLES, *(eval_loss_key(name) for name in EVAL_PARTS))

# ------------------------------------------------------------------ round settings


TRAIN_PARTS = "train-parts"  # ConfigRecord key: the prefix parts trained this round


class RoundSettings(BaseModel):
    """What a message's ConfigRecord ``config`` carries: the values of this round only."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)  # Flower adds its own keys

    base_fingerprint: str = Field(alias="base-fingerprint")  # the nodes' base must be this one
    learning_rate: float | None = Field(None, alias="round-learning-rate")  # after the run's lr decay
    proximal_mu: float = Field(0.0, alias="proximal-mu", ge=0)  # set by Flower's FedProx only
    # which prefix parts the nodes train this round (FederationConfig.round_parts); with
    # "personal" the shared part stays as received and the reply carries no arrays; FINALIZE
    # ends a secure round: nothing is trained, the message brings the round's shared prefix
    train_parts: Literal["all", "shared", "personal", "finalize"] = Field("all", alias=TRAIN_PARTS)
    # a secure round's cap on a node's weight (num-examples): SecAgg+ quantizes each update
    # times weight / cap, so a cap near the real weights keeps the sum precise
    max_weight: float | None = Field(None, alias="max-weight", gt=0)
    # the round, as Flower's strategies add it to a train message's config (0 where none does)
    server_round: int = Field(0, alias="server-round", ge=0)

    def to_config(self) -> dict[str, Any]:
        """The ConfigRecord entries (proximal-mu is left to Flower's FedProx, which sets it, and
        server-round to the strategy, which adds it beside them)."""
        values = {"base-fingerprint": self.base_fingerprint, TRAIN_PARTS: self.train_parts}
        if self.learning_rate is not None:
            values["round-learning-rate"] = self.learning_rate
        if self.max_weight is not None:
            values["max-weight"] = self.max_weight
        return values


FINALIZE = "finalize"  # train-parts after a secure round: each user keeps its interpolated prefix

# ------------------------------------------------------------------ shared prefix on the wire
SHARED_ARRAY_PREFIX = "shared."


def pack_shared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shared Prefix's `state_tensors()` as wire arrays: ``shared.<name>``, float32, contiguous."""
    return {SHARED_ARRAY_PREFIX + name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}


def _decoded(name: str, value: Any) -> np.ndarray:
    """A wire array's data as numpy, decoded from its bytes; a declared shape or dtype that disagrees is refused."""
    data = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    declared_shape, declared_dtype = getattr(value, "shape", data.shape), str(getattr(value, "dtype", data.dtype))
    if tuple(declared_shape) != data.shape or declared_dtype.removeprefix("torch.") != str(data.dtype):
        raise ShapeError(
            f"shared array {name!r} declares {declared_dtype} {tuple(declared_shape)} but holds "
            f"{data.dtype} {data.shape}"
        )
    return data


def unpack_shared(arrays: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Wire arrays -> the shared Prefix's tensors by name, checking names, decoded shapes, dtype, finiteness.

    `expected` maps the Prefix's tensor names to their shapes.
    """
    import torch

    names = {name.removeprefix(SHARED_ARRAY_PREFIX) for name in arrays}
    if any(not name.startswith(SHARED_ARRAY_PREFIX) for name in arrays) or names != set(expected):
        raise ShapeError(
            f"shared arrays {sorted(arrays)} do not match the shared prefix's "
            f"{sorted(SHARED_ARRAY_PREFIX + n for n in expected)}"
        )
    tensors = {}
    for wire_name, value in arrays.items():
        name = wire_name.removeprefix(SHARED_ARRAY_PREFIX)
        data = _decoded(wire_name, value)
        if data.dtype != np.float32:
            raise ShapeError(f"shared array {wire_name!r} has dtype {data.dtype}, expected float32")
        if tuple(data.shape) != tuple(expected[name]):
            raise ShapeError(f"shared array {wire_name!r} has shape {tuple(data.shape)}, expected {expected[name]}")
        if not np.isfinite(data).all():
            raise ShapeError(f"shared array {wire_name!r} contains NaN or Inf")
        tensors[name] = torch.from_numpy(data.copy())
    return tensors


def secure_round_order(names) -> list[str]:
    """The order of the shared tensors in a secure round's legacy Parameters (a list, no names)."""
    return sorted(names)


# ------------------------------------------------------------------ stored parts and the row prefix
def shared_store_id(user_id: str) -> str:
    """The store id of a user's copy of the shared prefix, kept beside the personal one.

    Validates `user_id` (BadUserIdError): ids ending in '@shared' are refused, so the
    result is never another user's personal id.
    """
    from .store.format import store_name

    return store_name(user_id, "shared")


def row_prefix(shared: torch.Tensor | None, personal: torch.Tensor | None) -> torch.Tensor | None:
    """A row's prefix: [shared ; personal] along the token axis, (L, 2, H, P_s + P_p, D); None if neither."""
    from .prefix import concat_key_values

    present = [kv for kv in (shared, personal) if kv is not None]
    return concat_key_values(*present) if present else None


def stored_row_prefix(parts: dict) -> torch.Tensor | None:
    """row_prefix of a user's stored parts ({'shared': Prefix, 'personal': Prefix}, as
    PrefixStore.load_parts gives them; either may be missing), detached."""
    shared, personal = (parts[p].key_values().detach() if p in parts else None for p in ("shared", "personal"))
    return row_prefix(shared, personal)


# ------------------------------------------------------------------ initialization
# Neutral text whose keys/values start a prefix: the model begins by behaving as if this
# had been read before the conversation, i.e. close to the base, and follows prompts.
DEFAULT_INIT_TEXT = (
    "Answer the request below helpfully and accurately, in the writing style this user prefers. "
    "Keep every fact, name and number from the request."
)


def init_text(tokenizer, num_tokens: int, text: str = DEFAULT_INIT_TEXT) -> str:
    """`text` repeated until it has at least `num_tokens` tokens under `tokenizer`.

    [shared ; personal] starts as this text's KV as a whole (shared: its first tokens), so
    every node and the coordinator make the same round-0 shared prefix.
    """
    per_copy = max(1, len(tokenizer(text).input_ids))
    return " ".join([text] * (1 + num_tokens // per_copy))
