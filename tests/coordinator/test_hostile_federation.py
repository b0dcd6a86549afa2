"""One bad actor hurts nobody else: a poisoning node and crashing nodes in real `flwr run` simulations."""

from __future__ import annotations

import time

import pytest
from fedprefix.coordinator.simulate import simulate

from tests.conftest import federation_config

HOSTILE = "fedprefix.simulations.hostile_nodes"


def _run(tmp_path, name: str, clientapp: str, **settings):
    config = federation_config(tmp_path / name, num_users=4, num_rounds=3, local_steps=6, audit_dir="", **settings)
    return simulate(config, clientapp=clientapp)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("honest"), "run", "fedprefix.client.app:app")


def test_one_poisoning_node_of_four_leaves_honest_users_within_five_percent(honest, tmp_path):
    poisoned = _run(tmp_path, "poisoned", f"{HOSTILE}:poisoning_app")
    assert [r.round for r in poisoned] == [1, 2, 3]
    assert all(len(r.clipped) == 1 for r in poisoned), "the reversed update is clipped every round"
    for name in ("eval_loss_personal", "eval_loss_shared"):
        clean, attacked = getattr(honest[-1], name), getattr(poisoned[-1], name)
        assert attacked <= clean * 1.05, f"{name}: {attacked:.4f} vs {clean:.4f} without the attacker"


def test_a_quarter_of_nodes_crashing_every_round_ends_no_round(tmp_path):
    rounds = _run(tmp_path, "crashing", f"{HOSTILE}:crashing_app")
    assert [r.round for r in rounds] == [1, 2, 3], "every round finishes"
    assert all(r.replies_accepted >= 1 and r.replies_rejected >= 1 for r in rounds)
    reasons = [x.reason for r in rounds for x in r.rejected]
    assert any("ClientAppException" in reason for reason in reasons)  # round 1: an exception
    assert any("died" in reason.lower() for reason in reasons)  # round 2: the process exited
    assert all("\x1b" not in reason and len(reason) <= 340 for reason in reasons)


def test_a_node_sending_garbage_in_the_secure_round_cannot_move_the_shared_prefix(tmp_path):
    """personal-init "interpolate": one node of four replaces its masked vector with random
    numbers. Its reply cannot be told apart alone; their sum lands outside what honest nodes
    can send, so the round's average is refused, the shared prefix stays round 2's, every user
    still finishes the round (interpolating toward it), and the run ends normally."""
    rounds = _run(tmp_path, "garbage", f"{HOSTILE}:garbage_mask_app", personal_init="interpolate")
    assert [r.round for r in rounds] == [1, 2, 3]
    reasons = [x.reason for x in rounds[2].rejected]
    assert any("secure average" in reason and "shared prefix kept" in reason for reason in reasons), reasons
    assert rounds[2].shared_update_norm is None and rounds[2].replies_accepted == 4
    assert rounds[2].eval_loss_shared == pytest.approx(rounds[1].eval_loss_shared, rel=1e-6)
    assert rounds[2].eval_loss_personal < rounds[2].eval_loss_shared  # each user's own share still helps


def test_a_node_dropping_out_of_the_secure_round_leaves_the_average_of_the_others(tmp_path):
    """SecAgg+ rebuilds a dropped node's masks from the others' shares: the round still applies
    the average of the three updates that arrived, and names the one that did not."""
    config = federation_config(tmp_path, num_users=4, num_rounds=2, local_steps=2, audit_dir="", personal_init="auto")
    rounds = simulate(config, clientapp=f"{HOSTILE}:secure_dropout_app")
    assert [r.round for r in rounds] == [1, 2]
    secure = rounds[1]
    assert secure.replies_accepted == 3 and secure.replies_rejected == 1
    assert "simulated drop-out of node" in secure.rejected[0].reason  # the node's own error, which SecAgg+ drops
    assert secure.shared_update_norm > 0 and secure.eval_loss_shared < rounds[0].eval_loss_shared


def test_a_node_that_stops_answering_holds_its_round_only_until_the_round_timeout(tmp_path):
    """Flower's default wait for a round is an hour; round-timeout bounds it, and the round
    goes on with the replies that came. The node stalls in round 2, when the others are
    warm and answer within a second, so the timeout alone decides which replies count."""
    timeout = 30.0  # also round 1's, whose nodes start cold: 16.6 s seen on a loaded 2-core box
    config = federation_config(
        tmp_path, num_users=4, num_rounds=2, local_steps=2, audit_dir="", mode="shared", round_timeout=timeout
    )
    started = time.monotonic()
    rounds = simulate(config, clientapp=f"{HOSTILE}:stalling_app")
    assert time.monotonic() - started < 300
    assert [r.round for r in rounds] == [1, 2]
    stalled = rounds[1]
    assert stalled.replies_accepted == 3 and timeout <= stalled.seconds < timeout + 60
