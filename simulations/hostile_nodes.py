"""Hostile and failing nodes for experiments and tests: fedprefix's own ClientApp, wrapped.

Every app here runs the real train/evaluate handlers; on the nodes it makes bad
(partition-id % 4 == 3, a quarter of the federation) it then misbehaves:

- `poisoning_app`: a well-formed reply whose shared update points the other way,
  `POISON_SCALE` times as long as the honest one, claiming the most examples the run
  accepts (run setting max-num-examples): what validation alone cannot catch.
- `crashing_app`: training fails mid-way, by an exception in odd rounds and by the
  process exiting in even rounds.
- `secure_dropout_app` (personal-init "interpolate"): the node fails in the secure round's
  training, after SecAgg+ has shared its keys: the other nodes' masks must be rebuilt.
- `stalling_app`: the node stops answering in round 2's training (it sleeps for an hour):
  the round must end at the run setting round-timeout with the other nodes' replies.
  Round 2, not 1: round 1 also times the nodes' start-up (imports, base model), which a
  loaded 2-core machine can stretch past a short timeout.
- `garbage_mask_app` (personal-init "interpolate"): in the secure round the node replaces
  its masked vector with random numbers, skipping SecAgg+'s clipping: the one thing a
  node can do there that the coordinator cannot see in its reply.

    fedprefix's simulate(config, clientapp="fedprefix.simulations.hostile_nodes:poisoning_app")
"""

from __future__ import annotations

import os
import time

import numpy as np
from fedprefix.client import app as real
from fedprefix.client.secure import is_secure_training, secure_aggregation_mod
from fedprefix.common.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

POISON_SCALE = 20.0


def is_bad(context: Context) -> bool:
    """The nodes these apps make misbehave: a quarter of them."""
    return int(context.node_config.get("partition-id", 0)) % 4 == 3


poisoning_app = ClientApp(mods=[real.audit_mod, real.dp_clipping_mod, secure_aggregation_mod])


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


crashing_app = ClientApp(mods=[real.audit_mod, real.dp_clipping_mod, secure_aggregation_mod])


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


def garbage_mask_mod(msg: Message, context: Context, call_next) -> Message:
    """Between SecAgg+ and the wire: a bad node's masked vector becomes random numbers."""
    reply = call_next(msg, context)
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if not is_bad(context) or reply.has_error() or configs is None or Key.MASKED_PARAMETERS not in configs:
        return reply
    rng = np.random.default_rng(int(context.node_config.get("partition-id", 0)))
    vectors = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
    configs[Key.MASKED_PARAMETERS] = [
        ndarray_to_bytes(rng.integers(0, 2**31, size=v.shape).astype(v.dtype)) for v in vectors
    ]
    return reply


garbage_mask_app = ClientApp(mods=[real.audit_mod, real.dp_clipping_mod, garbage_mask_mod, secure_aggregation_mod])
garbage_mask_app.train()(real.train)
garbage_mask_app.evaluate()(real.evaluate)


secure_dropout_app = ClientApp(mods=[real.audit_mod, real.dp_clipping_mod, secure_aggregation_mod])


@secure_dropout_app.train()
def dropping_train(msg: Message, context: Context) -> Message:
    if is_bad(context) and is_secure_training(msg):
        raise RuntimeError(f"simulated drop-out of node {context.node_config.get('partition-id')} mid secure round")
    return real.train(msg, context)


secure_dropout_app.evaluate()(real.evaluate)


stalling_app = ClientApp(mods=[real.audit_mod, real.dp_clipping_mod, secure_aggregation_mod])


@stalling_app.train()
def stalling_train(msg: Message, context: Context) -> Message:
    if is_bad(context) and int(msg.content["config"].get("server-round", 1)) == 2:
        time.sleep(3600)  # a device that went quiet without failing
    return real.train(msg, context)


stalling_app.evaluate()(real.evaluate)
