"""One bad actor hurts nobody else: a poisoning node and crashing nodes in real `flwr run` simulations."""

from __future__ import annotations

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
