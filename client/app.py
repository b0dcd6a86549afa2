"""The Flower ClientApp: each node trains its user's prefix and replies with the shared part only.

Train: receive the shared prefix -> fit the round's parts on local data (the same code
path as Personalizer.fit; with personal-init "shared" the first personal round copies the
received shared prefix into the user's own) -> save encrypted on the node -> reply with the
shared arrays, num-examples and scalar metrics. The personal prefix never leaves.
With personal-init "interpolate" the last round's training runs under SecAgg+ and ends with
a FINALIZE message (client/secure.py): the update leaves masked, the user's prefix never.
Evaluate: held-out loss per completion token with the base alone, the shared prefix,
and the user's whole prefix, so the personalization gain is visible every round.

An error (no data, bad rows, a lost key, another base) is raised: Flower turns it into
an error reply, which the coordinator records with its reason while the round goes on.

Under the Deployment Engine every message starts a process that imports this file, and
three of a secure round's four SecAgg+ stages only exchange keys and shares: so this file,
its mods and what they import stay free of torch and the model (a test checks), and the
handlers import the node when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedprefix.common.protocol import (
    ARRAYS,
    CONFIG,
    DP_WEIGHT,
    EVAL_PARTS,
    FINALIZE,
    METRICS,
    NUM_EXAMPLES,
    STEPS,
    TRAIN_LOSS,
    TRAIN_PARTS,
    TRAIN_SECONDS,
    RoundSettings,
    eval_loss_key,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .audit import audit_mod
from .secure import finalize, is_secure_training, secure_aggregation_mod, secure_train

if TYPE_CHECKING:
    from .node import Node


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod, applied only when the coordinator runs with DP and the round
    sends the shared prefix (a personal-only round replies without arrays: nothing to clip)."""
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    if KEY_CLIPPING_NORM in config and config.get(TRAIN_PARTS, "all") != "personal":
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# The audit log records replies after DP clipping and SecAgg+ masking: exactly what leaves the device.
app = ClientApp(mods=[audit_mod, dp_clipping_mod, secure_aggregation_mod])


def _setup(msg: Message, context: Context) -> tuple[Node, RoundSettings]:
    """What both handlers do first: open the node (run settings from its own context) and take the shared prefix."""
    from .node import open_node

    round_settings = RoundSettings.model_validate(dict(msg.content.config_records.get(CONFIG, ConfigRecord())))
    node = open_node(dict(context.run_config), dict(context.node_config))
    node.receive_shared(msg.content.array_records.get(ARRAYS), round_settings.base_fingerprint)
    return node, round_settings


def train_metrics(report) -> MetricRecord:
    """The metrics every training reply carries (protocol.TRAIN_METRICS)."""
    recent = report.train_loss[-5:]
    return MetricRecord(
        {
            NUM_EXAMPLES: report.num_train_examples,
            TRAIN_LOSS: sum(recent) / len(recent),
            TRAIN_SECONDS: report.seconds,
            STEPS: report.steps,
            DP_WEIGHT: 1.0,
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training round (or a secure round's training or its end: client/secure.py)."""
    if is_secure_training(msg):
        return secure_train(msg, context, train_metrics)
    node, round_settings = _setup(msg, context)
    if round_settings.train_parts == FINALIZE:
        return finalize(node, context, msg)
    report = node.train_round(round_settings)
    content = RecordDict({METRICS: train_metrics(report)})
    if node.config.sends_shared and round_settings.train_parts != "personal":
        content[ARRAYS] = ArrayRecord(node.shared_arrays())
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out loss for base only, shared only and shared + personal."""
    node, _ = _setup(msg, context)
    me = node.personalizer
    # a run without a shared part (mode "personal") reports the base's loss as "shared"
    chosen = {name: "none" if parts == "shared" and me.shared is None else parts for name, parts in EVAL_PARTS.items()}
    losses = {
        eval_loss_key(name): me.evaluate(node.eval_rows, parts=parts, accuracy=False).loss
        for name, parts in chosen.items()
    }
    metrics = MetricRecord({NUM_EXAMPLES: len(node.eval_rows), **losses})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)
