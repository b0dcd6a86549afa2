"""Hostile and failing nodes for experiments and tests: fedprefix's own ClientApp, wrapped.

Every app here runs the real train/evaluate handlers; on the nodes it makes bad
(partition-id % 4 == 3, a quarter of the federation) it then misbehaves:

- `poisoning_app`: a well-formed reply whose shared update points the other way,
  `POISON_SCALE` times as long as the honest one, claiming the most examples the run
  accepts (run setting max-num-examples): what validation alone cannot catch.
- `crashing_app`: training fails mid-way, by an exception in odd rounds and by the
  process exiting in even rounds.

    fedprefix's simulate(config, clientapp="fedprefix.simulations.hostile_nodes:poisoning_app")
"""

from __future__ import annotations

import os

from fedprefix.client import app as real
from fedprefix.common.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

POISON_SCALE = 20.0


def is_bad(context: Context) -> bool:
    """The nodes these apps make misbehave: a quarter of them."""
    return int(context.node_config.get("partition-id", 0)) % 4 == 3


poisoning_app = ClientApp(mods=[real.audit_mod, real.dp_clipping_mod])


@poisoning_app.train()
def poisoned_train(msg: Message, context: Context) -> Message:
    """Train honestly, then send the update reversed and scaled, with the largest weight accepted."""
    reply = real.train(msg, context)
    if not is_bad(context) or ARRAYS not in reply.content.array_records:
        return reply
    received = {name: a.numpy() for name, a in msg.content[ARRAYS].items()}
    trained = {name: a.numpy() for name, a in reply.content[ARRAYS].items()}
    reply.content[ARRAYS] = ArrayRecord(
        {name: Array(received[name] - POISON_SCALE * (trained[name] - received[name])) for name in trained}
    )
    reply.content[METRICS][NUM_EXAMPLES] = int(context.run_config.get("max-num-examples", 100_000))
    return reply


@poisoning_app.evaluate()
def honest_evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)


crashing_app = ClientApp(mods=[real.audit_mod, real.dp_clipping_mod])


@crashing_app.train()
def crashing_train(msg: Message, context: Context) -> Message:
    """A quarter of the nodes fail mid-train: an exception in odd rounds, the process exits in even ones."""
    if is_bad(context):
        server_round = int(msg.content["config"].get("server-round", 1))
        if server_round % 2 == 0:
            os._exit(3)  # the node's process dies, as on a device that loses power
        raise RuntimeError(f"simulated crash of node {context.node_config.get('partition-id')} in training")
    return real.train(msg, context)


@crashing_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
