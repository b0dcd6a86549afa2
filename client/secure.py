"""A node's side of the secure last round (personal_init "interpolate", coordinator/secure_round.py).

1. Training, under SecAgg+: the message is a legacy FitIns (the round's shared prefix S_prev
   and settings) that `secaggplus_mod` passes on in its "collect masked vectors" stage. The
   node trains its own copy of S_prev, stores it (L) encrypted, and replies with the update
   L - S_prev as a legacy FitRes; the mod clips, quantizes and masks it before it leaves, and
   clears the plain arrays. The training metrics wait in the node's Flower context.
2. FINALIZE: the coordinator sends the round's new shared prefix S; the node keeps
   S + a (L - S) as its prefix and replies with the waiting metrics, no arrays. (A node
   whose masked reply was lost gets no FINALIZE and keeps L, its copy trained this round.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from fedprefix.common.errors import ConfigError
from fedprefix.common.protocol import METRICS, SHARED_ARRAY_PREFIX, RoundSettings, secure_round_order
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

if TYPE_CHECKING:
    from .node import Node

LEGACY_FITINS = "fitins.parameters"  # the ArrayRecord of a legacy FitIns (the secure round's training)
PENDING = "fedprefix.secure-round"  # ConfigRecord in the node's context: metrics waiting for FINALIZE


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod, for the messages of a SecAgg+ round only (it expects its own
    settings in every training message; the other rounds' messages pass straight on)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_training(msg: Message) -> bool:
    return LEGACY_FITINS in msg.content.array_records


def secure_train(msg: Message, context: Context, train_metrics) -> Message:
    """Train this user's copy of the received shared prefix; reply with the update as a FitRes.

    `train_metrics(report)` makes the metrics every training reply carries; they wait for FINALIZE
    (the masked reply carries none: the coordinator learns them only once the round is over)."""
    from .node import open_node  # here, not at the top: see client/app.py

    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    settings = RoundSettings.model_validate(dict(fit_ins.config))
    node = open_node(dict(context.run_config), dict(context.node_config))
    names = secure_round_order(node.personalizer.shared.state_tensors())
    received = parameters_to_ndarrays(fit_ins.parameters)
    if len(received) != len(names):
        raise ConfigError(f"user {node.user_id}: the secure round sent {len(received)} tensors, expected {len(names)}")
    node.receive_shared(
        ArrayRecord({SHARED_ARRAY_PREFIX + n: Array(np.asarray(a)) for n, a in zip(names, received, strict=True)}),
        settings.base_fingerprint,
    )
    node.personalizer.personal = None  # the round trains a fresh copy of the shared prefix it received
    report = node.personalizer.fit(
        node.train_rows,
        max_steps=node.config.local_steps,
        learning_rate=settings.learning_rate or node.config.learning_rate,
        parts="personal",
    )
    node.personalizer.save()
    metrics = train_metrics(report)
    context.state.config_records[PENDING] = ConfigRecord(dict(metrics))
    own = node.personalizer.personal.state_tensors()
    base = node.personalizer.shared.state_tensors()
    update = [(own[n] - base[n]).detach().float().numpy() for n in names]
    weight = report.num_train_examples  # FedAvg's weight, as in the other rounds, within the round's cap
    if settings.max_weight is not None:
        weight = min(weight, int(settings.max_weight))
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), max(1, int(weight)), {})
    return Message(content=compat.fitres_to_recorddict(fit_res, keep_input=True), reply_to=msg)


def finalize(node: Node, context: Context, msg: Message) -> Message:
    """Keep S + a (L - S): the received shared prefix S moved toward this user's round result L."""
    import torch

    pending = context.state.config_records.get(PENDING)
    if pending is None or node.personalizer.personal is None:
        raise ConfigError(f"user {node.user_id}: asked to finish a secure round it did not train in")
    share = node.config.interpolation
    shared = node.personalizer.shared.state_tensors()
    with torch.no_grad():
        for name, tensor in node.personalizer.personal.state_tensors().items():
            tensor.copy_(shared[name] + share * (tensor - shared[name]))
    node.personalizer.save()
    del context.state.config_records[PENDING]
    return Message(content=RecordDict({METRICS: MetricRecord(dict(pending))}), reply_to=msg)
