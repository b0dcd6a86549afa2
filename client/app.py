"""The Flower ClientApp: each node trains its user's prefix and replies with the shared part only.

Train: receive the shared prefix -> fit [shared ; personal] on local data (the same
code path as Personalizer.fit) -> save both encrypted on the node -> reply with the
shared arrays, num-examples and scalar metrics. The personal prefix never leaves.
Evaluate: held-out loss per completion token with the base alone, the shared prefix,
and shared + personal, so the personalization gain is visible every round.

An error (no data, bad rows, a lost key, another base) is raised: Flower turns it into
an error reply, which the coordinator records with its reason while the round goes on.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .audit import audit_mod
from .node import Node, open_node


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod, applied only when the coordinator runs with DP."""
    config = msg.content.config_records.get("config", ConfigRecord())
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# The audit log records replies after DP clipping: exactly what leaves the device.
app = ClientApp(mods=[audit_mod, dp_clipping_mod])


def _setup(msg: Message, context: Context) -> tuple[Node, ConfigRecord]:
    """What both handlers do first: open the node and take the shared prefix."""
    config = msg.content.config_records.get("config", ConfigRecord())
    node = open_node(dict(config), dict(context.node_config))
    node.receive_shared(msg.content.array_records.get("arrays"), config.get("base-fingerprint"))
    return node, config


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training round."""
    node, config = _setup(msg, context)
    report = node.personalizer.fit(
        node.train_rows,
        max_steps=int(config.get("local-steps", node.config.local_steps)),
        learning_rate=float(config.get("round-learning-rate", node.config.learning_rate)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    node.personalizer.save()
    metrics = MetricRecord(
        {
            "num-examples": report.num_train_examples,
            "train-loss": sum(report.train_loss[-5:]) / len(report.train_loss[-5:]),
            "train-seconds": report.seconds,
            "steps": report.steps,
            "dp-weight": 1.0,  # equal weights, which Flower's DP accounting requires
        }
    )
    content = RecordDict({"metrics": metrics})
    if node.config.sends_shared:
        content["arrays"] = node.shared_arrays()
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out loss for base only, shared only and shared + personal."""
    node, _ = _setup(msg, context)
    losses = {
        f"eval-loss-{name}": node.personalizer.evaluate(node.eval_rows, parts=parts).loss
        for name, parts in (("base", "none"), ("shared", "shared"), ("personal", "all"))
    }
    metrics = MetricRecord({"num-examples": len(node.eval_rows), **losses})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
