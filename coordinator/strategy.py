"""Aggregation of the shared prefix only, with Flower's own strategies doing the math.

`PrefixStrategy` wraps a Flower strategy (FedAvg, FedAdam or FedProx, optionally inside
Flower's client-side-clipping DP wrapper) and adds what a prefix federation needs:
- per-round settings (learning-rate decay, local steps, the base fingerprint);
- validation of every reply: wrong keys or shapes, NaN/Inf, an update norm above the
  bound, arrays in personal mode, errors from the node; a rejected reply is logged with
  its reason and the round goes on with the rest;
- the round record (coordinator/records.py).
Composition rather than subclassing keeps `FedAvg.aggregate_train` untouched, which
Flower's privacy accountant requires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from fedprefix.common.config import FederationConfig
from fedprefix.common.protocol import (
    DP_WEIGHT,
    FINALIZE,
    METRICS,
    NUM_EXAMPLES,
    SHARED_ARRAY_PREFIX,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    RoundSettings,
    eval_loss_key,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from .records import PrivacyRecord, Rejection, RoundRecord, RunRecorder
from .replies import (
    all_finite,
    bound_updates,
    evaluate_reply_problem,
    median_weight,
    payload_bytes,
    train_reply_problem,
    update_norm,
)
from .secure_round import finalize_message, secure_average

log = logging.getLogger(__name__)
SAMPLED_BY_MINIMUM = 1e-12  # a fraction of the connected nodes that rounds to none (see build_inner_strategy)


def build_inner_strategy(config: FederationConfig) -> Strategy:
    """Flower's strategy for `config.aggregator`, with DP around it if asked for."""
    train_nodes, eval_nodes = config.round_sizes
    dp = config.dp_noise_multiplier > 0
    common = dict(
        # Flower samples max(int(fraction x nodes connected), min_nodes): a fraction too small to
        # count makes the minimums decide, so every round samples exactly the sizes above, however
        # many nodes are connected (a fraction nodes/users sampled 3 for a round of 2 where a
        # Deployment Engine had 6 nodes, and Flower's DP wrapper then raised). 0 is no evaluation.
        fraction_train=SAMPLED_BY_MINIMUM,
        fraction_evaluate=SAMPLED_BY_MINIMUM if eval_nodes else 0.0,
        min_train_nodes=train_nodes,
        min_evaluate_nodes=eval_nodes,
        min_available_nodes=train_nodes,
        weighted_by_key=DP_WEIGHT if dp else NUM_EXAMPLES,
    )
    robust = {
        "krum": lambda: Krum(**common, num_malicious_nodes=config.byzantine_nodes),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=config.byzantine_nodes),
        "trimmedavg": lambda: FedTrimmedAvg(**common, beta=config.trim_fraction),
        "median": lambda: FedMedian(**common),
    }
    if config.aggregator == "fedadam":
        inner = FedAdam(**common, eta=config.server_lr)
    elif config.aggregator == "fedprox":
        inner = FedProx(**common, proximal_mu=config.proximal_mu)
    elif config.aggregator in robust:
        inner = robust[config.aggregator]()
    else:
        inner = FedAvg(**common)
    if not dp:
        return inner
    return DifferentialPrivacyClientSideFixedClipping(
        inner,
        noise_multiplier=config.dp_noise_multiplier,
        clipping_norm=config.dp_clipping_norm,
        num_sampled_clients=train_nodes,
        accountant=_accountant(config),  # FedAvg or FedProx (FederationConfig refuses others under DP)
    )


def _accountant(config: FederationConfig):
    """Flower's RDP accountant (needs the dp-accounting package); None where unavailable."""
    try:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return RdpAccountant(
            PrivacyConfig(
                target_delta=config.dp_target_delta,
                population_size=config.num_users,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
    except ImportError as exc:  # dp-accounting not installed
        log.warning("privacy accounting unavailable: %s", exc)
        return None


def replace_one_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon where a neighbouring run replaces one user's data (Flower's accountant: zeroes it).

    A round averages a fixed number n of sampled users' updates, each clipped to C: zeroing one
    moves the mean by at most C/n, which Flower's noise (std z C / n) is sized for; replacing it
    moves the mean by up to 2C/n, as noise of multiplier z/2 would for C/n. Rounds sample a
    fixed number without replacement, so no amplification by sampling is claimed either way.
    """
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier / 2), releases))
    return float(accountant.get_epsilon(delta))


class PrefixStrategy(Strategy):
    """Validates replies and records rounds around a Flower strategy."""

    def __init__(
        self,
        inner: Strategy,
        config: FederationConfig,
        expected_arrays: ArrayRecord,
        base_fingerprint: str,
        recorder: RunRecorder | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.config = config
        self.expected = {k.removeprefix(SHARED_ARRAY_PREFIX): tuple(a.shape) for k, a in expected_arrays.items()}
        self.base_fingerprint = base_fingerprint
        self.recorder = recorder
        self.current: dict[str, np.ndarray] = {}
        self.pending: dict = {}
        self.last_norm: float | None = None  # the last applied update's norm: bounds a secure round's
        self.last_weight: float | None = None  # the last round's median num-examples: caps a secure round's
        self.last_max_weight = 1.0  # ... and its largest (the cap where weights are not clipped)

    def _add_round_settings(
        self, config: ConfigRecord, learning_rate: float | None = None, train_parts: str = "all"
    ) -> None:
        """A message carries this round's values only; nodes read the run settings from their own context."""
        settings = RoundSettings(
            base_fingerprint=self.base_fingerprint, learning_rate=learning_rate, train_parts=train_parts
        )
        config.update(settings.to_config())

    @property
    def dp(self) -> bool:
        """Whether Flower's DP wrapper (client-side fixed clipping) runs the aggregation."""
        return isinstance(self.inner, DifferentialPrivacyClientSideFixedClipping)

    @property
    def round_sends_shared(self) -> bool:
        """Whether this round's training replies carry the shared prefix (not in personal-only rounds)."""
        return self.config.sends_shared and self.pending.get("parts") != "personal"

    # ---------------------------------------------------------------- training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        parts = self.config.round_parts(server_round)
        self.pending = {"started": time.time(), "round": server_round, "rejected": [], "clipped": [], "parts": parts}
        self.current = {k.removeprefix(SHARED_ARRAY_PREFIX): a.numpy() for k, a in arrays.items()}
        self._add_round_settings(config, self.config.round_learning_rate(server_round), parts)
        if self.config.is_secure_round(server_round):
            return self._secure_round(server_round, arrays, grid)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.pending["sampled"] = sorted(m.metadata.dst_node_id for m in messages)
        return messages

    def _secure_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """Run the round's training under SecAgg+ (coordinator/secure_round.py); return the messages
        that end it: the new shared prefix (or, if the average was refused, the old one) to every
        node whose update is in the average (if the round halted: to every sampled node)."""
        settings = RoundSettings(
            base_fingerprint=self.base_fingerprint,
            learning_rate=self.config.round_learning_rate(server_round),
            train_parts=self.pending["parts"],
            max_weight=self._secure_max_weight(),
        )
        result = secure_average(
            grid, self.config, self.current, settings, server_round, self.config.round_sizes[0], self.last_norm
        )
        self.pending.update(sampled=result.sampled, uplink=result.uplink)
        for node in sorted(set(result.sampled) - set(result.nodes)) if result.nodes else []:
            # its masks were rebuilt; its own error where it sent one
            reason = "secure round: " + result.errors.get(node, "no masked update (the node failed or dropped out)")
            self.pending.setdefault("rejected", []).append(Rejection(node=node, reason=reason))
        if result.problem is not None:
            log.warning("round %d: %s", server_round, result.problem)
            self._reject_round(result.problem)
        new = arrays
        if result.average is not None:
            new = ArrayRecord(
                {SHARED_ARRAY_PREFIX + k: Array(self.current[k] + result.average[k]) for k in self.current}
            )
            self.pending["secure_arrays"] = new
        settings = RoundSettings(base_fingerprint=self.base_fingerprint, train_parts=FINALIZE).to_config()
        config = ConfigRecord({**settings, "server-round": server_round})  # as Flower's strategies add it
        # A halted round has no list of contributors: every sampled node that trained still
        # finishes (toward the old shared prefix); the others answer that they did not train.
        return [finalize_message(node, new, config, server_round) for node in result.nodes or result.sampled]

    def _secure_max_weight(self) -> float:
        """A secure round's weight cap (a node's weight is min(its rows, the cap)): the bound clear
        rounds clip weights to (update-clip-factor x their median weight), or without clipping the
        largest weight the last round accepted; before any round that accepted replies, 1: users
        weigh equally.

        SecAgg+ quantizes weight / cap x update: a cap of max-num-examples (100,000) made a weight
        of 5 a ratio of 5e-5, whose updates fell below its quantization step (10-13% off)."""
        if not self.last_weight:
            return 1.0
        if self.config.update_clip_factor > 0:
            return max(1.0, self.config.update_clip_factor * self.last_weight)
        return max(1.0, self.last_max_weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies, senders, sampled = list(replies), set(), self.pending.get("sampled")
        accepted = [
            m
            for m in replies
            if self._accept(m, self._sender_problem(m, senders, sampled) or self.check_train_reply(m))
        ]
        if accepted:
            self.last_weight = median_weight(accepted)
            self.last_max_weight = max(float(m.content[METRICS][NUM_EXAMPLES]) for m in accepted)
        if self.round_sends_shared and not self.dp:  # under DP the node's fixed clipping bounds each update
            for node, scale in bound_updates(
                accepted, self.current, SHARED_ARRAY_PREFIX, self.config.update_clip_factor
            ).items():
                log.warning("round %d: update of node %d clipped to %.3g of its norm", server_round, node, scale)
                self.pending.setdefault("clipped", []).append(node)
        self.pending.update(
            accepted=len(accepted),
            uplink=self.pending.get("uplink", 0) + sum(payload_bytes(m) for m in replies if not m.has_error()),
            train_seconds=sum(float(m.content[METRICS][TRAIN_SECONDS]) for m in accepted),
        )
        arrays, metrics = None, None
        # The noise is sized for the mean of every sampled reply: a mean of fewer gets less privacy
        # than asked for (Flower's wrapper refuses such a round only where FedAvg's accountant runs).
        partial_dp = self.dp and sampled is not None and len(accepted) != len(sampled)
        if partial_dp and accepted and self.round_sends_shared:
            self._reject_round(
                f"not aggregated: DP needs every sampled node's reply, and {len(accepted)} of {len(sampled)} "
                "were accepted; shared prefix kept"
            )
        try:
            if accepted and self.round_sends_shared and not partial_dp:
                arrays, metrics = self.inner.aggregate_train(server_round, accepted)
            elif accepted:  # personal mode or round, or a DP round not applied: nothing to aggregate but the metrics
                metrics = aggregate_metricrecords([m.content for m in accepted], NUM_EXAMPLES)
        except Exception as exc:  # the run ends only on its own failure, never on what nodes sent
            log.error("round %d: aggregation failed, shared prefix kept: %s", server_round, exc)
            self._reject_round(f"aggregation failed ({type(exc).__name__}: {exc}); shared prefix kept")
            arrays, metrics = None, None
        if self.config.is_secure_round(server_round):  # the replies only ended it: the average came before
            arrays = self.pending.get("secure_arrays")
        if not all_finite(arrays):
            self._reject_round("the aggregate was not finite; shared prefix kept")
            arrays = None
        self.pending["train_loss"] = float(metrics[TRAIN_LOSS]) if metrics and TRAIN_LOSS in metrics else None
        self.pending["norm"] = self._update_norm(arrays)
        self.last_norm = self.pending["norm"] or self.last_norm
        return arrays, metrics

    def _accept(self, msg: Message, problem: str | None, stage: str = "") -> bool:
        """Record a rejected reply with its reason; True when there is none."""
        if problem is None:
            return True
        node = msg.metadata.src_node_id
        log.warning("round %s: rejected %sreply of node %d: %s", self.pending.get("round"), stage, node, problem)
        self.pending.setdefault("rejected", []).append(Rejection(node=node, reason=stage + problem))
        return False

    def _sender_problem(self, msg: Message, senders: set[int], sampled: list[int] | None) -> str | None:
        """A reply from a node this round did not sample, or a node's second reply (Flower's
        SuperLink sends neither; a check here does not rest on it). An error reply, which is
        never accepted, keeps its own reason: one the SuperLink writes for a node it lost
        (missed heartbeats) comes from the SuperLink, not from a sampled node."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            return None
        if sampled is not None and node not in sampled:
            return "the node was not sampled for this round"
        if node in senders:
            return "the node already replied in this round"
        senders.add(node)
        return None

    def _reject_round(self, reason: str) -> None:
        self.pending.setdefault("rejected", []).append(Rejection(node=0, reason=f"round: {reason}"))

    def check_train_reply(self, msg: Message) -> str | None:
        """Why a training reply must be rejected, or None to accept it (coordinator/replies.py)."""
        return train_reply_problem(msg, self.config, self.expected, self.current, self.round_sends_shared)

    def _update_norm(self, arrays: ArrayRecord | None) -> float | None:
        if arrays is None or not self.current:
            return None
        return update_norm({k.removeprefix(SHARED_ARRAY_PREFIX): a.numpy() for k, a in arrays.items()}, self.current)

    # ---------------------------------------------------------------- evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._add_round_settings(config)
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self.pending["eval_sampled"] = sorted(m.metadata.dst_node_id for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        senders, sampled = set(), self.pending.get("eval_sampled")
        good = [
            m
            for m in replies
            if self._accept(
                m, self._sender_problem(m, senders, sampled) or evaluate_reply_problem(m, self.config), "evaluation: "
            )
        ]
        try:
            metrics = aggregate_metricrecords([m.content for m in good], NUM_EXAMPLES) if good else None
        except Exception as exc:  # never end the run on what nodes sent
            self._reject_round(f"evaluation metrics could not be aggregated ({exc})")
            metrics = None
        self.pending["eval"] = dict(metrics) if metrics else {}
        return metrics

    # ---------------------------------------------------------------- round end

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Strategy.start after each round (as its evaluate_fn): write the record."""
        if server_round == 0 or self.recorder is None:
            return None
        p, evaluation = self.pending, self.pending.get("eval", {})
        rejected = p.get("rejected", [])
        record = RoundRecord(
            round=server_round,
            sampled_users=p.get("sampled", []),
            replies_accepted=p.get("accepted", 0),
            replies_rejected=len([r for r in rejected if not r.reason.startswith(("evaluation:", "round:"))]),
            rejected=rejected,
            clipped=p.get("clipped", []),
            train_loss=p.get("train_loss"),
            eval_loss_base=evaluation.get(eval_loss_key("base")),
            eval_loss_shared=evaluation.get(eval_loss_key("shared")),
            eval_loss_personal=evaluation.get(eval_loss_key("personal")),
            shared_update_norm=p.get("norm"),
            uplink_bytes=p.get("uplink", 0),
            train_seconds_sum=p.get("train_seconds", 0.0),
            seconds=time.time() - p.get("started", time.time()),
            privacy=self._privacy(),
        )
        self.recorder.append_round(record)
        return None

    def _privacy(self) -> PrivacyRecord | None:
        if not self.dp:
            return None
        spent = self.inner.privacy_spent()
        noise = dict(noise_multiplier=self.inner.noise_multiplier, clipping_norm=self.inner.clipping_norm)
        if spent is None:
            return PrivacyRecord(
                **noise, epsilon=None, delta=None, reason="no accountant: install the dp-accounting package"
            )
        return PrivacyRecord(
            **noise,
            epsilon=float(spent.epsilon),
            epsilon_replace_one=replace_one_epsilon(self.inner.noise_multiplier, spent.num_releases, spent.delta),
            delta=float(spent.delta),
        )

    def summary(self) -> None:
        self.inner.summary()
