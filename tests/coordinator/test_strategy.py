"""PrefixStrategy: malformed replies are rejected with a reason; sampling really samples."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from fedprefix.common.config import FederationConfig, sample_size
from fedprefix.coordinator.replies import bound_updates
from fedprefix.coordinator.secure_round import average_problem, clipping_range
from fedprefix.coordinator.strategy import (
    PrefixStrategy,
    build_inner_strategy,
    payload_bytes,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)
from flwr.supercore.task_identity import TaskIdentity

SHAPE = (4, 64)


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity outside a running Flower process."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _strategy(**settings) -> PrefixStrategy:
    config = FederationConfig(num_users=4, **settings)
    initial = ArrayRecord({"shared.embedding.weight": Array(np.zeros(SHAPE, dtype=np.float32))})
    strategy = PrefixStrategy(build_inner_strategy(config), config, initial, "f" * 64)
    strategy.current = {k.removeprefix("shared."): a.numpy() for k, a in initial.items()}
    strategy.pending = {"rejected": []}
    return strategy


def _metrics(examples=5, **overrides) -> dict:
    values = {"num-examples": examples, "train-loss": 1.0, "train-seconds": 1.0, "steps": 2, "dp-weight": 1.0}
    return {**values, **overrides}


def _reply(arrays: dict | None, examples: int = 5, node: int = 7, **metrics) -> Message:
    instruction = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    values = {k: v for k, v in _metrics(examples, **metrics).items() if v is not None}
    content = RecordDict({"metrics": MetricRecord(values)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content=content, reply_to=instruction)


def _good() -> dict:
    return {"shared.embedding.weight": np.full(SHAPE, 0.01, dtype=np.float32)}


def test_good_reply_is_accepted_and_sized():
    msg = _reply(_good())
    assert _strategy().check_train_reply(msg) is None
    assert payload_bytes(msg) == 4 * 64 * 4 + 5 * 8


@pytest.mark.parametrize(
    ("arrays", "examples", "reason"),
    [
        ({"shared.other": np.zeros(SHAPE, np.float32)}, 5, "do not match the shared prefix's"),
        ({"shared.embedding.weight": np.zeros(SHAPE, np.int64)}, 5, "dtype int64, expected float32"),
        ({"shared.embedding.weight": np.zeros((3, 64), np.float32)}, 5, "has shape (3, 64), expected (4, 64)"),
        ({"shared.embedding.weight": np.full(SHAPE, np.nan, np.float32)}, 5, "NaN or Inf"),
        ({"shared.embedding.weight": np.full(SHAPE, np.inf, np.float32)}, 5, "NaN or Inf"),
        ({"shared.embedding.weight": np.full(SHAPE, 1e4, np.float32)}, 5, "exceeds the bound"),
        (None, 5, "exactly one ArrayRecord"),
        (_good(), 0, "'num-examples' = 0 is not a whole number in [1, "),
    ],
)
def test_malformed_replies_are_rejected_with_reason(arrays, examples, reason):
    assert reason in _strategy().check_train_reply(_reply(arrays, examples))


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"examples": float("nan")}, "'num-examples' is nan, not a finite number"),
        ({"examples": float("inf")}, "'num-examples' is inf, not a finite number"),
        ({"examples": 1e12}, "not a whole number in [1, 100000] (run setting max-num-examples)"),
        ({"examples": 1e-6}, "'num-examples' = 1e-06 is not a whole number"),  # a weight 10^6 x under a secure cap
        ({"examples": 2.5}, "'num-examples' = 2.5 is not a whole number"),
        ({"train-loss": -1e6}, "'train-loss' = -1e+06 is outside [0, 1000], not a loss per token"),
        ({"train-loss": 1e9}, "'train-loss' = 1e+09 is outside [0, 1000]"),
        ({"steps": -7}, "'steps' = -7 is not a whole number in [0, 10] (run setting local-steps)"),
        ({"steps": 11}, "'steps' = 11 is not a whole number in [0, 10]"),
        ({"train-loss": None}, "missing metrics ['train-loss']"),
        ({"train-loss": [1.0, 2.0]}, "metric 'train-loss' must be a number, got list"),
        ({"dp-weight": float("nan")}, "'dp-weight' is nan"),
        ({"dp-weight": 2.0}, "'dp-weight' must be 1"),
        ({"train-seconds": -1.0}, "'train-seconds' = -1 is outside [0, "),  # summed into the record: it ended the run
        ({"train-seconds": 1e308}, "'train-seconds' = 1e+308 is outside [0, "),
        ({"extra": 1.0}, "unexpected metrics ['extra']"),  # Flower would refuse to aggregate the round
    ],
)
def test_hostile_metrics_are_rejected_not_fatal(metrics, reason):
    examples = metrics.pop("examples", 5)
    problem = _strategy().check_train_reply(_reply(_good(), examples, **metrics))
    assert problem is not None and reason in problem, problem


def test_a_bogus_dtype_string_is_rejected_not_fatal():
    good = Array(np.zeros(SHAPE, np.float32))
    bogus = Array(dtype="not-a-dtype", shape=SHAPE, stype=good.stype, data=good.data)
    msg = _reply(None)
    msg.content["arrays"] = ArrayRecord({"shared.embedding.weight": bogus})
    assert "declares not-a-dtype" in _strategy().check_train_reply(msg)


def test_one_hostile_reply_cannot_end_the_round_or_poison_the_average():
    strategy = _strategy()
    hostile = [
        _reply(_good(), node=2, examples=float("nan")),
        _reply({"shared.embedding.weight": np.full(SHAPE, 50.0, np.float32)}, node=3),  # well-formed, far away
        _reply(_good(), node=4, **{"train-loss": [1.0]}),
    ]
    arrays, _ = strategy.aggregate_train(1, [_reply(_good(), node=1), _reply(_good(), node=5), *hostile])
    assert sorted(r.node for r in strategy.pending["rejected"]) == [2, 4]
    assert strategy.pending["clipped"] == [3]  # clipped to 3x the median update norm, not rejected
    moved = np.abs(arrays["shared.embedding.weight"].numpy()).max()
    assert np.isfinite(arrays["shared.embedding.weight"].numpy()).all() and moved <= 3 * 0.01 + 1e-6


@pytest.mark.parametrize("aggregator", ["fedavg", "trimmedavg", "median"])
def test_a_reply_with_a_metric_of_its_own_cannot_void_the_round(aggregator):
    """Flower aggregates only replies whose metric keys agree: an extra key in one reply made it
    refuse the whole round, so one node kept the shared prefix from ever moving."""
    strategy = _strategy(aggregator=aggregator)
    replies = [_reply(_good(), node=n) for n in (1, 2, 3)] + [_reply(_good(), node=9, extra=1.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and [r.node for r in strategy.pending["rejected"]] == [9]


def test_only_the_first_reply_of_each_sampled_node_counts():
    strategy = _strategy()
    strategy.pending["sampled"] = [1, 2, 3]
    far = {"shared.embedding.weight": np.full(SHAPE, 0.02, np.float32)}
    replies = [_reply(_good(), node=1), _reply(_good(), node=2), _reply(far, node=2), _reply(far, node=8)]
    arrays, _ = strategy.aggregate_train(1, replies)
    reasons = {(r.node, r.reason) for r in strategy.pending["rejected"]}
    assert reasons == {(2, "the node already replied in this round"), (8, "the node was not sampled for this round")}
    assert np.allclose(arrays["shared.embedding.weight"].numpy(), 0.01)  # neither second voice moved the average


def test_updates_are_held_still_where_the_median_update_did_not_move():
    """A clipping bound of 0 (the low median of the norms) clipped nothing before: one node's
    update then went into the average whole."""
    current = {"embedding.weight": np.zeros(SHAPE, np.float32)}
    still = {"shared.embedding.weight": np.zeros(SHAPE, np.float32)}
    far = {"shared.embedding.weight": np.full(SHAPE, 5.0, np.float32)}
    replies = [_reply(still, node=1), _reply(still, node=2), _reply(far, node=3)]
    assert bound_updates(replies, current, "shared.", 3.0) == {3: 0.0}
    assert not replies[2].content["arrays"]["shared.embedding.weight"].numpy().any()


def test_evaluation_replies_are_checked_too():
    strategy = _strategy()
    instruction = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="evaluate")
    losses = {"eval-loss-base": 2.0, "eval-loss-shared": 1.5, "eval-loss-personal": 1.0}
    good = Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, **losses})}), reply_to=instruction)
    other = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=8, message_type="evaluate")
    missing = Message(RecordDict({"metrics": MetricRecord(losses)}), reply_to=other)
    metrics = strategy.aggregate_evaluate(1, [good, missing])
    assert metrics["eval-loss-personal"] == 1.0
    assert [r.reason for r in strategy.pending["rejected"]] == ["evaluation: missing metrics ['num-examples']"]


def test_an_array_whose_bytes_disagree_with_its_declared_shape_is_rejected():
    honest = Array(np.zeros((3,), np.float32))  # 3 values on the wire ...
    forged = Array(dtype=honest.dtype, shape=SHAPE, stype=honest.stype, data=honest.data)  # ... declared (4, 64)
    msg = _reply(None)
    msg.content["arrays"] = ArrayRecord({"shared.embedding.weight": forged})
    reason = _strategy().check_train_reply(msg)
    assert reason is not None, "a forged shape must be rejected, not aggregated"


def test_personal_mode_refuses_arrays_and_node_errors_are_reasons():
    strategy = _strategy(mode="personal")
    assert "must not carry arrays" in strategy.check_train_reply(_reply(_good()))
    assert strategy.check_train_reply(_reply(None)) is None
    instruction = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=3, message_type="train")
    failed = Message(Error(code=0, reason="user003: wrong key"), reply_to=instruction)
    assert strategy.check_train_reply(failed) == "node error: user003: wrong key"


def test_round_goes_on_with_the_good_replies():
    strategy = _strategy()
    replies = [_reply(_good(), node=1), _reply({"shared.embedding.weight": np.full(SHAPE, np.nan, np.float32)}, node=2)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["shared.embedding.weight"].numpy(), 0.01)
    assert strategy.pending["accepted"] == 1
    assert [r.node for r in strategy.pending["rejected"]] == [2]
    assert strategy.pending["norm"] == pytest.approx(0.01 * (4 * 64) ** 0.5, rel=1e-4)


def test_sampling_sizes_and_aggregators():
    assert sample_size(0.5, 5) == 3 and sample_size(0.01, 5) == 1
    inner = build_inner_strategy(FederationConfig(num_users=10, fraction_train=0.3))
    assert isinstance(inner, FedAvg) and inner.min_train_nodes == 3 and inner.min_available_nodes == 3
    assert isinstance(build_inner_strategy(FederationConfig(aggregator="fedadam")), FedAdam)
    assert isinstance(build_inner_strategy(FederationConfig(aggregator="fedprox")), FedProx)
    assert isinstance(build_inner_strategy(FederationConfig(aggregator="krum", num_users=4)), Krum)
    assert isinstance(build_inner_strategy(FederationConfig(aggregator="trimmedavg")), FedTrimmedAvg)
    assert isinstance(build_inner_strategy(FederationConfig(aggregator="median")), FedMedian)
    dp = build_inner_strategy(FederationConfig(dp_noise_multiplier=1.0))
    assert isinstance(dp, DifferentialPrivacyClientSideFixedClipping) and dp.strategy.weighted_by_key == "dp-weight"


def test_users_per_round_samples_exactly_k_distinct_users_each_round():
    for users, k in ((5, 2), (49, 1), (10, 7), (3, 3), (100, 29)):
        inner = build_inner_strategy(FederationConfig(num_users=users, users_per_round=k))
        seen = set()
        for server_round in range(1, 6):
            trained = [
                m.metadata.dst_node_id
                for m in inner.configure_train(server_round, ArrayRecord(), ConfigRecord(), _Grid(users))
            ]
            evaluated = [
                m.metadata.dst_node_id
                for m in inner.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), _Grid(users))
            ]
            assert len(trained) == len(set(trained)) == k and len(evaluated) == len(set(evaluated)) == k, (users, k)
            seen.update(trained)
        assert len(seen) > k or k == users, "users are sampled afresh each round"
    # fraction-evaluate still lowers (or turns off) the users evaluated per round
    assert FederationConfig(num_users=10, users_per_round=4, fraction_evaluate=0.2).round_sizes == (4, 2)
    assert FederationConfig(num_users=10, users_per_round=4, fraction_evaluate=0).round_sizes == (4, 0)
    assert FederationConfig(num_users=10, fraction_train=0.25).round_sizes == (3, 10)
    with pytest.raises(ValueError, match="users_per_round 5 is more than num_users 4"):
        FederationConfig(num_users=4, users_per_round=5)
    with pytest.raises(ValueError, match="set users_per_round or fraction_train, not both"):
        FederationConfig(num_users=4, users_per_round=2, fraction_train=0.5)


def test_bad_run_config_names_the_key():
    with pytest.raises(ValueError, match="num_rounds"):
        FederationConfig.from_run_config({"num-rounds": 0})
    with pytest.raises(ValueError, match="no_such_setting"):
        FederationConfig.from_run_config({"no-such-setting": 1})
    with pytest.raises(ValueError, match="needs shared_tokens > 0"):
        FederationConfig(mode="shared", shared_tokens=0)
    with pytest.raises(ValueError, match="mode 'personal' sends none"):
        FederationConfig(mode="personal", dp_noise_multiplier=1.0)


def test_pyproject_lists_every_run_setting_with_its_default():
    """`flwr run .` takes its settings from pyproject: they must be FederationConfig's, all of them."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == FederationConfig().to_run_config()


def test_messages_carry_this_rounds_values_only():
    """Run settings stay in each node's own run config: proximal-mu reaches nodes under FedProx only."""
    for aggregator in ("fedavg", "fedadam"):
        config = ConfigRecord()
        _strategy(aggregator=aggregator)._add_round_settings(config, 0.01)
        assert set(config.keys()) == {"base-fingerprint", "round-learning-rate", "train-parts"}, aggregator
    prox = _strategy(aggregator="fedprox")
    config = ConfigRecord()
    prox._add_round_settings(config, 0.01)
    configured = prox.inner.configure_train(1, ArrayRecord(), config, _Grid(4))
    assert {m.content["config"]["proximal-mu"] for m in configured} == {0.01}


def test_round_phases_name_the_parts_trained_and_are_validated():
    config = FederationConfig(num_rounds=4, shared_only_rounds=1, personal_only_rounds=2, personal_init="text")
    assert [config.round_parts(r) for r in (1, 2, 3, 4)] == ["shared", "all", "personal", "personal"]
    assert [FederationConfig(num_rounds=3, personal_init="text").round_parts(r) for r in (1, 2, 3)] == [
        "shared",
        "shared",
        "all",
    ]
    # the copy recipe: the shared part alone, then each user's copy of it at its own rate; never both parts
    copy = FederationConfig(num_rounds=4, learning_rate=0.01, copy_learning_rate=0.002, personal_init="shared")
    assert [copy.round_parts(r) for r in (1, 2, 3, 4)] == ["shared", "shared", "shared", "personal"]
    assert [copy.round_learning_rate(r) for r in (3, 4)] == [0.01, 0.002]
    two_copies = FederationConfig(num_rounds=4, personal_only_rounds=2, personal_init="shared")
    assert [two_copies.round_parts(r) for r in (1, 2, 3, 4)] == ["shared", "shared", "personal", "personal"]
    assert FederationConfig(num_rounds=1).round_parts(1) == "personal"  # a copy of the starting shared part
    FederationConfig(mode="personal", personal_tokens=4)  # unequal parts are fine where nothing is copied
    with pytest.raises(ValueError, match="personal_tokens \\(4\\) must equal shared_tokens \\(8\\)"):
        FederationConfig(personal_tokens=4)
    assert FederationConfig(mode="shared").round_parts(1) == "shared"
    assert FederationConfig(mode="personal").round_parts(1) == "personal"
    with pytest.raises(ValueError, match="exceeds num_rounds = 3"):
        FederationConfig(num_rounds=3, shared_only_rounds=2, personal_only_rounds=2)
    with pytest.raises(ValueError, match="need mode 'shared\\+personal', not 'shared'"):
        FederationConfig(mode="shared", personal_only_rounds=1)


def test_a_personal_only_round_keeps_the_shared_prefix_and_refuses_arrays():
    """In a personal-only round nodes send nothing shared: a reply with arrays is rejected, and
    the round aggregates metrics only, so the shared prefix stays what it was."""
    strategy = _strategy(num_rounds=2, personal_only_rounds=1, personal_init="shared")
    initial = ArrayRecord({"shared.embedding.weight": Array(np.zeros(SHAPE, dtype=np.float32))})
    config = ConfigRecord()
    messages = strategy.configure_train(2, initial, config, _Grid(4))
    assert {m.content["config"]["train-parts"] for m in messages} == {"personal"}
    assert "personal-only round" in strategy.check_train_reply(_reply(_good(), node=1))
    arrays, metrics = strategy.aggregate_train(2, [_reply(None, node=1), _reply(None, node=2)])
    assert arrays is None and metrics["train-loss"] == 1.0 and strategy.pending["accepted"] == 2
    strategy.configure_train(1, initial, ConfigRecord(), _Grid(4))  # a round that trains both parts
    assert "exactly one ArrayRecord" in strategy.check_train_reply(_reply(None, node=1))


class _Grid:
    """Just enough of a Flower Grid for configure_train to sample nodes."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self):
        return self.nodes

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


def test_interpolate_recipe_is_validated_and_federates_its_last_round():
    config = FederationConfig(num_rounds=4, personal_init="interpolate", copy_learning_rate=0.002)
    assert [config.round_parts(r) for r in (1, 2, 3, 4)] == ["shared", "shared", "shared", "personal"]
    assert [config.is_secure_round(r) for r in (3, 4)] == [False, True]
    assert config.round_learning_rate(4) == config.learning_rate  # the federated rate, not the copy's
    for settings, reason in [
        (dict(aggregator="krum"), "needs aggregator 'fedavg' without differential privacy"),
        (dict(dp_noise_multiplier=1.0), "needs aggregator 'fedavg' without differential privacy"),
        (dict(personal_only_rounds=2), "every round but the last"),
        (dict(num_rounds=3, shared_only_rounds=1), "every round but the last"),
        (dict(num_users=1), "at least 2 users in the last round"),
        (dict(num_users=4, users_per_round=1), "at least 2 users in the last round"),
    ]:
        with pytest.raises(ValueError, match=reason):
            FederationConfig(personal_init="interpolate", **settings)
    with pytest.raises(ValueError, match="interpolation"):
        FederationConfig(personal_init="interpolate", interpolation=0)
    # "auto", the default: interpolate where the run allows a secure last round, else the plain copy
    assert FederationConfig().personal_recipe == "interpolate" and FederationConfig().secure_last_round
    for settings in (dict(aggregator="krum"), dict(dp_noise_multiplier=1.0), dict(num_users=1)):
        config = FederationConfig(**settings)
        assert config.personal_recipe == "shared" and config.copies_shared and not config.secure_last_round
    assert FederationConfig(mode="shared").secure_last_round is False


def test_a_secure_average_outside_what_honest_nodes_can_send_is_refused():
    """Masked replies are seen only in their sum: the sum is what gets checked. Honest nodes clip
    every value to the clipping range, so their average lies within it; and a round's update
    stays within update-clip-factor x the last round's norm."""
    config = FederationConfig(personal_init="interpolate", local_steps=10, learning_rate=0.03)
    bound = clipping_range(config, 0.03)
    assert bound == pytest.approx(1.2)
    current = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    names = sorted(current)
    honest = [np.full((2, 3), 0.01, np.float32), np.full(4, -0.01, np.float32)]
    assert average_problem(honest, names, current, bound, config, previous_norm=0.05) is None
    outside = [honest[0], np.array([0.0, 0.0, 0.0, 5.0], np.float32)]
    assert "outside the clipping range" in average_problem(outside, names, current, bound, config, 0.05)
    assert "not finite" in average_problem(
        [honest[0], np.full(4, np.nan, np.float32)], names, current, bound, config, 0.05
    )
    assert "expected" in average_problem([honest[0]], names, current, bound, config, 0.05)
    far = [np.full((2, 3), 1.0, np.float32), np.full(4, 1.0, np.float32)]  # in range, but 3.2 vs 3 x 0.5
    assert "exceeds its bound 1.5" in average_problem(far, names, current, bound, config, previous_norm=0.5)
    assert average_problem(far, names, current, bound, config, previous_norm=2.0) is None


def test_a_halted_or_refused_secure_round_keeps_the_shared_prefix_and_still_ends_on_every_node(monkeypatch):
    """Whatever the secure round gave, its nodes get FINALIZE with the prefix that holds: the new
    one if the average was applied, else the old one (a halted round: every sampled node)."""
    from fedprefix.coordinator import strategy as module
    from fedprefix.coordinator.secure_round import SecureResult

    initial = ArrayRecord({"shared.embedding.weight": Array(np.zeros(SHAPE, dtype=np.float32))})
    outcomes = {
        "halted": SecureResult(None, [], [1, 2, 3], 0, "secure aggregation halted (too few nodes replied)"),
        "refused": SecureResult(None, [1, 2], [1, 2, 3], 10, "secure average ... shared prefix kept"),
        "applied": SecureResult({"embedding.weight": np.full(SHAPE, 0.5, np.float32)}, [1, 3], [1, 2, 3], 10),
    }
    for name, outcome in outcomes.items():
        strategy = _strategy(num_rounds=1)
        monkeypatch.setattr(module, "secure_average", lambda *args, outcome=outcome: outcome)
        messages = strategy.configure_train(1, initial, ConfigRecord(), _Grid(3))
        assert [m.metadata.dst_node_id for m in messages] == ([1, 2, 3] if name == "halted" else outcome.nodes)
        assert {m.content["config"]["train-parts"] for m in messages} == {"finalize"}
        sent = messages[0].content["arrays"]["shared.embedding.weight"].numpy()
        assert float(sent.max()) == (0.5 if name == "applied" else 0.0), name
        replies = [_reply(None, node=m.metadata.dst_node_id) for m in messages]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert (arrays is not None) == (name == "applied"), name
        rejected = [r.reason for r in strategy.pending["rejected"]]
        assert any(r.startswith("round:") for r in rejected) == (name != "applied"), name
        assert sum("no masked update" in r for r in rejected) == (0 if name == "halted" else 3 - len(outcome.nodes))


def test_of_two_replies_neither_sets_the_bounds_alone():
    """With two replies the median is their mean, so a hostile one sat under both caps: all-zero
    arrays claiming 100,000 examples replaced the shared prefix. The low median is the smaller."""
    strategy = _strategy()
    strategy.current = {"embedding.weight": np.full(SHAPE, 1.0, np.float32)}
    honest = _reply({"shared.embedding.weight": np.full(SHAPE, 1.01, np.float32)}, examples=5, node=1)
    wiping = _reply({"shared.embedding.weight": np.zeros(SHAPE, np.float32)}, examples=100_000, node=2)
    arrays, _ = strategy.aggregate_train(1, [honest, wiping])
    assert strategy.pending["clipped"] == [2]
    values = arrays["shared.embedding.weight"].numpy()
    assert np.abs(values - 1.0).max() <= 3 * 0.01 + 1e-6, "moved at most the bound: 3x the honest update"


def test_every_round_samples_exactly_its_size_however_many_nodes_are_connected():
    """A Deployment Engine with more nodes than num_users (an extra or re-registered SuperNode):
    a fraction users/num_users sampled 3 for a round of 2, and Flower's DP wrapper then raised."""
    for dp in (0.0, 1.0):
        config = FederationConfig(num_users=4, users_per_round=2, dp_noise_multiplier=dp)
        inner = build_inner_strategy(config)
        for server_round, connected in enumerate((4, 6, 40), start=1):
            trained = list(inner.configure_train(server_round, ArrayRecord(), ConfigRecord(), _Grid(connected)))
            evaluated = list(inner.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), _Grid(connected)))
            assert len(trained) == len(evaluated) == 2, (dp, connected)
    quiet = build_inner_strategy(FederationConfig(num_users=4, fraction_evaluate=0))
    assert list(quiet.configure_evaluate(1, ArrayRecord(), ConfigRecord(), _Grid(4))) == []


def _moved(value: float, node: int, examples: int = 5) -> Message:
    return _reply({"shared.embedding.weight": np.full(SHAPE, value, np.float32)}, examples=examples, node=node)


def test_under_dp_no_update_is_clipped_to_a_bound_taken_from_the_others():
    """The median-relative clip made one user's data move every other update (the noise is sized
    for C / n): under DP only the node's fixed clipping bounds an update."""
    replies = [_moved(0.0, 1), _moved(0.0, 2), _moved(0.05, 3), _moved(0.05, 4)]
    clear = _strategy()
    clear.pending["sampled"] = [1, 2, 3, 4]
    clear.aggregate_train(1, [copy_of(m) for m in replies])
    assert clear.pending["clipped"] == [3, 4]  # a median of 0 holds them still
    private = _strategy(dp_noise_multiplier=1.0, dp_clipping_norm=10.0)
    private.configure_train(1, _zeros(), ConfigRecord(), _Grid(4))  # DP's accounting opens the round
    arrays, _ = private.aggregate_train(1, replies)
    assert private.pending.get("clipped", []) == [] and arrays is not None


def _zeros() -> ArrayRecord:
    return ArrayRecord({"shared.embedding.weight": Array(np.zeros(SHAPE, dtype=np.float32))})


def copy_of(msg: Message) -> Message:
    import copy

    return copy.deepcopy(msg)


@pytest.mark.parametrize("aggregator", ["fedavg", "fedprox"])
def test_under_dp_a_round_missing_a_reply_says_why_it_was_not_applied_and_keeps_its_losses(aggregator):
    """The noise is sized for the mean of every sampled reply. Flower's wrapper refuses a round
    that lost one only where FedAvg's accountant runs: with the others it applied it, unsaid."""
    strategy = _strategy(dp_noise_multiplier=1.0, aggregator=aggregator)
    strategy.configure_train(1, _zeros(), ConfigRecord(), _Grid(4))
    nan = _reply({"shared.embedding.weight": np.full(SHAPE, np.nan, np.float32)}, node=4)
    arrays, metrics = strategy.aggregate_train(1, [_moved(0.01, 1), _moved(0.01, 2), _moved(0.01, 3), nan])
    assert arrays is None and metrics["train-loss"] == 1.0
    reasons = [r.reason for r in strategy.pending["rejected"]]
    assert any("not aggregated: DP needs every sampled node's reply, and 3 of 4 were accepted" in r for r in reasons)


def _evaluation(node: int, examples: int, personal: float) -> Message:
    instruction = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="evaluate")
    losses = {"eval-loss-base": 2.0, "eval-loss-shared": 2.0, "eval-loss-personal": personal}
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": examples, **losses})}), reply_to=instruction)


def test_evaluation_counts_one_reply_per_sampled_node_and_real_losses():
    """One node could set the recorded personal loss: replying three times, from an unsampled
    node, or with a negative loss."""
    strategy = _strategy()
    list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), _Grid(4)))
    assert strategy.pending["eval_sampled"] == [1, 2, 3, 4]
    honest = [_evaluation(node, 5, 2.0) for node in (1, 2, 3)]
    hostile = [_evaluation(3, 5, 0.1), _evaluation(3, 5, 0.1), _evaluation(99, 5, 0.1), _evaluation(4, 5, -50.0)]
    metrics = strategy.aggregate_evaluate(1, honest + hostile)
    assert metrics["eval-loss-personal"] == 2.0
    reasons = sorted(r.reason for r in strategy.pending["rejected"])
    assert sum("already replied" in r for r in reasons) == 2 and sum("not sampled" in r for r in reasons) == 1
    assert any("'eval-loss-personal' = -50 is outside [0, 1000]" in r for r in reasons)


def test_a_secure_rounds_weight_cap_is_the_clear_rounds_or_equal_weights_before_any():
    """A cap of max-num-examples (100,000) before any clear round made a weight of 5 a ratio of
    5e-5, which SecAgg+'s quantization swamped (10-13% off the average)."""
    strategy = _strategy()
    assert strategy._secure_max_weight() == 1.0
    strategy.pending["sampled"] = [1, 2, 3]
    strategy.aggregate_train(1, [_moved(0.01, 1, 4), _moved(0.01, 2, 6), _moved(0.01, 3, 50)])
    assert strategy._secure_max_weight() == 3 * 6
    unclipped = _strategy(update_clip_factor=0)
    unclipped.pending["sampled"] = [1, 2]
    unclipped.aggregate_train(1, [_moved(0.01, 1, 4), _moved(0.01, 2, 50)])
    assert unclipped._secure_max_weight() == 50


@pytest.mark.parametrize("aggregator", ["fedadam", "krum", "multikrum", "trimmedavg", "median"])
def test_dp_is_refused_with_an_aggregator_one_user_moves_further_than_the_noise_covers(aggregator):
    """The noise is sized for a plain mean (one clipped update moves it by C / n); an auditor
    measured one user moving FedAdam's output 5.8x that, krum's 5.7x, the median's 2-5x."""
    refused = f"differential privacy needs aggregator 'fedavg' or 'fedprox', not '{aggregator}'"
    with pytest.raises(ValueError, match=refused):
        FederationConfig(num_users=4, dp_noise_multiplier=1.0, aggregator=aggregator)
    FederationConfig(num_users=4, aggregator=aggregator)  # without DP: as before


def test_dp_clipping_above_the_update_bound_is_refused():
    """Honest updates clipped to 10 were rejected at a bound of 1, each voiding its DP round."""
    with pytest.raises(ValueError, match="dp_clipping_norm 10.0 is above max_update_norm 1.0"):
        FederationConfig(dp_noise_multiplier=1.0, dp_clipping_norm=10.0, max_update_norm=1.0)


def test_the_replace_one_epsilon_is_flowers_at_half_the_noise_multiplier():
    """Flower's accountant zeroes one user's data (a move of C / n); replacing it moves the mean
    by up to 2C / n, which noise of multiplier z / 2 covers under Flower's relation."""
    from fedprefix.coordinator.strategy import _accountant, replace_one_epsilon
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    def flowers(z: float, releases: int) -> float:
        accountant = _accountant(FederationConfig(num_users=4, dp_noise_multiplier=z))
        for _ in range(releases):
            accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=2, population_size=4))
        return accountant.get_privacy_spent().epsilon

    for z, releases in ((0.8, 1), (0.8, 3), (2.0, 10)):
        replaced = replace_one_epsilon(z, releases, 1e-5)
        assert replaced == pytest.approx(flowers(z / 2, releases), rel=1e-6) and replaced > flowers(z, releases)


def test_an_update_clipped_to_the_bound_is_not_rejected_for_float_rounding():
    """Clipped to 1.0 by Flower, 113 of 200 random float32 updates measured above 1.0 here: with
    dp_clipping_norm equal to max_update_norm each voided its DP round (a reviewer's finding)."""
    from fedprefix.coordinator.replies import NORM_ROUNDING, update_norm
    from flwr.supercore.differential_privacy import compute_clip_model_update  # what fixedclipping_mod runs

    config = FederationConfig(dp_noise_multiplier=1.0, dp_clipping_norm=1.0, max_update_norm=1.0)
    rng = np.random.default_rng(0)
    norms = []
    for _ in range(200):
        old = rng.normal(size=SHAPE).astype(np.float32)
        new = [old + rng.normal(size=SHAPE).astype(np.float32)]
        compute_clip_model_update(new, [old], config.dp_clipping_norm)
        norms.append(update_norm({"shared.embedding.weight": new[0]}, {"shared.embedding.weight": old}))
    assert max(norms) > config.max_update_norm  # what was rejected
    assert max(norms) <= config.max_update_norm * (1 + NORM_ROUNDING)


def test_an_error_reply_for_a_lost_node_keeps_its_reason():
    """The SuperLink answers for a node it lost (missed heartbeats) from its own id: the reply
    was recorded as 'the node was not sampled', hiding why the round lost a user."""
    strategy = _strategy()
    list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), _Grid(4)))
    # the reply's sender is no node of the round (here: an id the round did not sample)
    instruction = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=1 << 40, message_type="evaluate")
    lost = Message(Error(code=0, reason="Node unavailable: missed heartbeats"), reply_to=instruction)
    honest = [_evaluation(node, 5, 2.0) for node in (1, 2, 4)]
    strategy.aggregate_evaluate(1, [*honest, lost])
    (rejected,) = strategy.pending["rejected"]
    assert rejected.reason == "evaluation: node error: Node unavailable: missed heartbeats"
