"""The last round of personal_init "interpolate": each user's update aggregated under SecAgg+.

Each user keeps the round's new shared prefix S moved part of the way toward its own
round result L (S + a (L - S), model interpolation). Were L sent in the clear, the
coordinator could compute that prefix, against the rule that a user's prefix never
leaves its device. Under Flower's SecAgg+ every node sends its update L - S_prev masked
with pairwise one-time pads that cancel in the sum: the coordinator learns the weighted
average of the updates and nothing about any one of them, as long as it follows the
protocol and fewer than the reconstruction threshold of nodes collude with it (SecAgg+'s
honest-but-curious model).

Flower 1.42 runs SecAgg+ on its legacy path only (`SecAggPlusWorkflow` on a
`LegacyContext`, FitIns/FitRes records); `secure_average` drives that workflow for one
round with a legacy strategy that only samples and collects, and the nodes answer its
messages through `secaggplus_mod` (client/secure.py).

What this round cannot check: a masked reply is seen only in the sum, so no per-reply
test (finiteness, norm, weight) applies. A hostile node can still move the average; it is
bounded afterwards: every value of an honest average lies within the clipping range that
honest nodes clip to, and the update's norm must stay within `update_clip_factor` x the
previous round's (shared prefixes of a run move alike from round to round). An average
outside either bound is refused, and the shared prefix stays as it was: the users
interpolate toward that instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from fedprefix.common.config import FederationConfig
from fedprefix.common.protocol import ARRAYS, CONFIG, RoundSettings, secure_round_order
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, Parameters, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from .replies import node_error, payload_bytes

log = logging.getLogger(__name__)

# SecAgg+ settings. In a round of up to NEIGHBOURS nodes every node shares its secrets with
# every other; beyond, with the NEIGHBOURS - 1 nearest on a ring that Flower shuffles anew each
# round (SecAgg+'s sparse graph). Sharing with all made a round's work grow as N^3: 100 users
# took 292 s on 2 cores, 200 were still exchanging shares after 8 minutes (an auditor's runs).
# Half of a node's shares rebuild its masks: up to half of its neighbours may drop out, and
# the coordinator learns its update only with more than half of them colluding (for a random
# fifth of all nodes colluding, a chance of 3e-8 per node with 63 neighbours).
NEIGHBOURS = 63  # odd: Flower puts half of the others on each side of a node
RECONSTRUCTION_THRESHOLD = 0.5


def num_shares(num_nodes: int) -> int | float:
    """SecAggPlusWorkflow's num_shares for a round of `num_nodes`: all of them (1.0), or NEIGHBOURS."""
    return 1.0 if num_nodes <= NEIGHBOURS else NEIGHBOURS


# Adam moves a value by at most ~lr per step (exactly lr at its first step, rarely up to
# ~3 lr with beta1 0.9, beta2 0.999): honest updates of `steps` steps lie within this
# many x lr x steps; values outside are clipped by the node before masking.
CLIP_STEPS_FACTOR = 4.0


def clipping_range(config: FederationConfig, learning_rate: float) -> float:
    """The per-value bound nodes clip their masked update to."""
    return CLIP_STEPS_FACTOR * learning_rate * config.local_steps


@dataclass
class SecureResult:
    """What one secure round gave the coordinator."""

    average: dict[str, np.ndarray] | None  # the weighted average update by tensor name; None: refused
    nodes: list[int]  # nodes whose masked update is in the sum
    sampled: list[int]
    uplink: int  # bytes the nodes sent over all four SecAgg+ stages
    problem: str | None = None  # why the average was refused (None: accepted)
    errors: dict[int, str] = field(default_factory=dict)  # each failed node's first error, or why its reply was unread


class _SampleAndCollect(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow needs: it samples the round's nodes and keeps
    the unmasked average that the workflow hands to `aggregate_fit`."""

    def __init__(self, fit_ins: FitIns, num_nodes: int) -> None:
        self.fit_ins, self.num_nodes = fit_ins, num_nodes
        self.average: Parameters | None = None
        self.sampled: list[int] = []
        self.nodes: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        clients = client_manager.sample(self.num_nodes, min_num_clients=self.num_nodes)
        self.sampled = sorted(client.node_id for client in clients)
        return [(client, self.fit_ins) for client in clients]

    def aggregate_fit(self, server_round, results, failures):
        # SecAggPlusWorkflow sets every result's parameters to the unmasked weighted average
        self.nodes = sorted(proxy.node_id for proxy, _ in results)
        self.average = results[0][1].parameters if results else None
        return self.average, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _CheckingGrid:
    """The grid as the workflow sees it (it only calls send_and_receive): it counts the bytes of
    every reply, and turns a reply the workflow could not read into an error reply, which
    SecAgg+ treats as that node dropping out. Flower's workflow reads replies unchecked: one
    masked vector of the wrong length, or a reply without its record, raised out of it and
    ended the run."""

    def __init__(self, grid: Grid, shapes: list[tuple[int, ...]], strategy: _SampleAndCollect) -> None:
        self.grid, self.shapes, self.strategy, self.uplink = grid, shapes, strategy, 0
        self.errors: dict[int, str] = {}  # SecAgg+ counts a failed node as a dropout, and keeps no reason

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        stage = messages[0].content.config_records[RECORD_KEY_CONFIGS][SecAggKey.STAGE] if messages else None
        replies = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in sent:  # not asked, or a second reply: the workflow would count it
                log.warning("secure round: reply of node %d dropped: no message of this stage awaits it", node)
                continue
            request = sent.pop(node)
            if reply.has_error():
                self.errors.setdefault(node, node_error(reply))
                replies.append(reply)
                continue
            self.uplink += reply_bytes(reply)
            problem = _unreadable(reply, stage, self.shapes, set(self.strategy.sampled))
            if problem is not None:
                log.warning("secure round: %s reply of node %d counts as a dropout: %s", stage, node, problem)
                self.errors.setdefault(node, f"{stage} reply unreadable: {problem}")
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=problem), reply_to=request)
            replies.append(reply)
        return replies


def _unreadable(reply: Message, stage: str, shapes: list[tuple[int, ...]], sampled: set[int]) -> str | None:
    """Why SecAggPlusWorkflow could not read a reply of `stage` (what each stage takes from it)."""
    try:
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        if stage == Stage.SETUP:
            keys = [record[SecAggKey.PUBLIC_KEY_1], record[SecAggKey.PUBLIC_KEY_2]]
            return None if all(isinstance(k, bytes) for k in keys) else "public keys that are not bytes"
        if stage == Stage.SHARE_KEYS:
            return _paired(record[SecAggKey.DESTINATION_LIST], record[SecAggKey.CIPHERTEXT_LIST], None)
        if stage == Stage.UNMASK:
            return _paired(record[SecAggKey.NODE_ID_LIST], record[SecAggKey.SHARE_LIST], sampled)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            vectors = [bytes_to_ndarray(b) for b in record[SecAggKey.MASKED_PARAMETERS]]
            if [v.shape for v in vectors] != shapes or any(v.dtype.kind not in "iu" for v in vectors):
                return f"masked vectors of shapes {[v.shape for v in vectors][:4]}, expected integers of {shapes[:4]}"
            compat.recorddict_to_fitres(reply.content, keep_input=True)  # the workflow reads its FitRes too
    except Exception as exc:  # anything the workflow would have raised on
        return f"unreadable ({type(exc).__name__}: {exc})"[:200]
    return None


def _paired(nodes, values, allowed: set[int] | None) -> str | None:
    """A node list and a bytes list of equal length (node ids among `allowed`, where given)."""
    if not (isinstance(nodes, list) and isinstance(values, list) and len(nodes) == len(values)):
        return "node and value lists that do not pair up"
    if not all(isinstance(v, bytes) for v in values) or not all(type(n) is int for n in nodes):
        return "node ids that are not integers or values that are not bytes"
    if allowed is not None and not set(nodes) <= allowed:
        return "shares of nodes that were not sampled"
    return None


def reply_bytes(reply: Message) -> int:
    """A SecAgg+ reply's payload: what payload_bytes counts, plus its config values (keys,
    shares and the masked vector travel there as bytes; numbers count 8)."""
    total = payload_bytes(reply)
    for record in reply.content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


def secure_average(
    grid: Grid,
    config: FederationConfig,
    current: dict[str, np.ndarray],
    settings: RoundSettings,
    server_round: int,
    num_nodes: int,
    previous_norm: float | None,
) -> SecureResult:
    """Run SecAgg+ for `server_round`: sample `num_nodes` nodes, send each the shared prefix
    `current` with the round's `settings` (learning rate, weight cap), and return the weighted
    average of their updates, checked."""
    names = secure_round_order(current)
    parameters = ndarrays_to_parameters([current[name] for name in names])
    strategy = _SampleAndCollect(FitIns(parameters, settings.to_config()), num_nodes)
    clients = SimpleClientManager()
    for node_id in grid.get_node_ids():
        clients.register(GridClientProxy(node_id, grid, grid.run.run_id))
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
        client_manager=clients,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
    bound = clipping_range(config, settings.learning_rate or config.learning_rate)
    # a masked reply is the node's weight (one value), then its weighted update, tensor by tensor
    counting = _CheckingGrid(grid, [(1,)] + [tuple(current[name].shape) for name in names], strategy)
    workflow = SecAggPlusWorkflow(
        num_shares(num_nodes),
        RECONSTRUCTION_THRESHOLD,
        clipping_range=bound,
        max_weight=settings.max_weight or 1.0,  # the strategy always sets one (_secure_max_weight)
        timeout=config.round_timeout,  # Flower's default: wait for ever
    )
    result = SecureResult(average=None, nodes=[], sampled=[], uplink=0)
    try:
        workflow(counting, context)  # type: ignore[arg-type]  # duck-typed: send_and_receive only
    except Exception as exc:  # what nodes sent may still break it (e.g. shares that do not combine)
        log.error("secure round %d failed: %s: %s", server_round, type(exc).__name__, exc)
        result.problem = f"secure aggregation failed ({type(exc).__name__}); shared prefix kept"
    result.nodes, result.sampled, result.uplink = strategy.nodes, strategy.sampled, counting.uplink
    result.errors = counting.errors
    if result.problem is not None:
        result.nodes = []  # no average: the round halted
        return result
    if strategy.average is None:
        # the nodes' own errors, which their answers to the round's end do not carry (they did not train)
        why = "".join(f"; node {node}: {error}" for node, error in list(result.errors.items())[:3])
        result.problem = f"secure aggregation halted (too few nodes replied{why}); shared prefix kept"
        return result
    arrays = parameters_to_ndarrays(strategy.average)
    result.problem = average_problem(arrays, names, current, bound, config, previous_norm)
    if result.problem is None:
        result.average = {name: np.asarray(a, dtype=np.float32) for name, a in zip(names, arrays, strict=True)}
    return result


def average_problem(
    arrays: list[np.ndarray],
    names: list[str],
    current: dict[str, np.ndarray],
    bound: float,
    config: FederationConfig,
    previous_norm: float | None,
) -> str | None:
    """Why the unmasked average update must be refused, or None to apply it."""
    shapes = [tuple(current[name].shape) for name in names]
    if [tuple(a.shape) for a in arrays] != shapes:
        return f"secure average has shapes {[a.shape for a in arrays]}, expected {shapes}; shared prefix kept"
    if not all(np.isfinite(a).all() for a in arrays):
        return "secure average is not finite; shared prefix kept"
    largest = max(float(np.abs(a).max()) for a in arrays)
    if largest > bound * (1 + 1e-3):  # honest nodes clip to the bound; quantization adds far less
        return (
            f"secure average has a value of {largest:.3g}, outside the clipping range {bound:.3g}; shared prefix kept"
        )
    norm = math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays))
    limit = config.max_update_norm
    if previous_norm and config.update_clip_factor > 0:
        limit = min(limit, config.update_clip_factor * previous_norm)
    if norm > limit:
        return f"secure average update norm {norm:.3g} exceeds its bound {limit:.3g}; shared prefix kept"
    return None


def finalize_message(node_id: int, arrays: ArrayRecord, config: ConfigRecord, server_round: int) -> Message:
    """The message that ends a secure round on one node: the new shared prefix and FINALIZE."""
    return Message(
        content=RecordDict({ARRAYS: arrays, CONFIG: config}),
        dst_node_id=node_id,
        message_type=MessageType.TRAIN,
        group_id=str(server_round),
    )
