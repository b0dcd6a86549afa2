"""How many simulated nodes train at once, and their CPUs: the cores of one round, and memory."""

from __future__ import annotations

import logging

import pytest
from fedprefix.common.config import FederationConfig
from fedprefix.coordinator import node_sizing
from fedprefix.coordinator.node_sizing import GIB, NodePlan, node_memory, nodes_in_memory, plan_for_machine, plan_nodes

BUILT_IN = 134_515_008  # the built-in base's parameters


def test_a_round_s_nodes_share_the_cores_so_flower_starts_no_actor_per_core():
    """Flower's pool is Ray CPUs / node CPUs actors, whatever the nodes; each loads its own base."""
    assert plan_nodes(FederationConfig(num_users=4), cores=64) == NodePlan(cpus=16, at_once=4)
    assert plan_nodes(FederationConfig(num_users=4), cores=2) == NodePlan(cpus=1, at_once=2)  # one CPU each
    assert plan_nodes(FederationConfig(num_users=100, users_per_round=10), cores=40) == NodePlan(4, 10)
    # evaluation samples more nodes than training here: the larger round sets the share
    assert plan_nodes(FederationConfig(num_users=20, fraction_train=0.1), cores=40) == NodePlan(2, 20)
    # Ray gets the CPUs of the nodes at once, no more: 16 cores, 6 nodes of 2 would pool 8 actors
    six = FederationConfig(num_users=6)
    assert plan_nodes(six, 16).federation_config(six) == (
        "num-supernodes=6 client-resources-num-cpus=2 init-args-num-cpus=12"
    )
    four = FederationConfig(num_users=4)
    assert plan_nodes(four, 2).federation_config(four).endswith("client-resources-num-cpus=1 init-args-num-cpus=2")
    # CPUs given per node: as many nodes at once as the cores hold, at least one that can start
    assert plan_nodes(four, 2, cpus=4) == NodePlan(4, 1)
    assert plan_nodes(four, 2, cpus=4).federation_config(four).endswith("num-cpus=4 init-args-num-cpus=4")
    assert plan_nodes(four, 8, cpus=1) == NodePlan(1, 4)
    for bad in (0, 0.5, 2.0, True):  # flwr run refuses a fraction ("'float' object cannot be interpreted...")
        with pytest.raises(ValueError, match="must be a whole number, at least 1"):
            plan_nodes(four, 8, cpus=bad)


def test_memory_bounds_the_nodes_at_once_and_they_get_the_cores():
    """A 16-core machine with room for 2 copies of the base runs 2 nodes on 8 threads each; Flower's
    pool (Ray CPUs / node CPUs) then holds exactly 2 actors."""
    four = FederationConfig(num_users=4)
    assert plan_nodes(four, cores=16, nodes_fitting=2) == NodePlan(cpus=8, at_once=2)
    plan = plan_nodes(FederationConfig(num_users=8), cores=16, nodes_fitting=3)
    assert plan == NodePlan(cpus=5, at_once=3)
    assert plan.federation_config(FederationConfig(num_users=8)).endswith("num-cpus=5 init-args-num-cpus=15")
    assert plan_nodes(four, cores=16, nodes_fitting=0) == NodePlan(cpus=16, at_once=1)  # still starts
    assert plan_nodes(four, cores=2, nodes_fitting=10) == NodePlan(cpus=1, at_once=2)  # cores decide


def test_node_memory_estimate_follows_the_base_and_is_above_what_was_measured():
    assert 0.41 * GIB < node_memory(107_328) < 0.6 * GIB  # tiny-llama: a second node added 0.41 GiB
    assert 1.2 * GIB < node_memory(BUILT_IN) < 1.6 * GIB  # the built-in base: 1.20 GiB
    # 16 GiB free: the rest of the run takes ~2 GiB (1.82 measured), the remainder holds 9 built-in nodes
    assert nodes_in_memory(BUILT_IN, 16 * GIB) == 9
    assert nodes_in_memory(BUILT_IN, 3 * GIB) == 0
    assert nodes_in_memory(7_000_000_000, 64 * GIB) == 0  # a 7B base: not one node in 64 GiB


def test_a_machine_short_of_memory_says_so(caplog):
    four = FederationConfig(num_users=4, base="smollm2-135m-instruct")
    with caplog.at_level(logging.WARNING, logger=node_sizing.__name__):
        assert plan_for_machine(four, 16, BUILT_IN, 6 * GIB) == NodePlan(cpus=8, at_once=2)
        assert plan_for_machine(four, 16, BUILT_IN, 2 * GIB) == NodePlan(cpus=16, at_once=1)
    first, second = (record.getMessage() for record in caplog.records)
    assert "about 6.0 GiB of memory is free and a training node of smollm2-135m-instruct takes about 1.5 GiB" in first
    assert "2 of a round's 4 nodes train at once, on 8 CPUs each" in first and "lack of memory" not in first
    assert "may be stopped for lack of memory" in second
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=node_sizing.__name__):
        assert plan_for_machine(four, 2, BUILT_IN, 64 * GIB) == NodePlan(cpus=1, at_once=2)  # the cores decide
        assert plan_for_machine(four, 2, BUILT_IN, None) == NodePlan(cpus=1, at_once=2)  # memory not known
    assert not caplog.records


def test_simulate_refuses_a_base_that_cannot_load_before_it_touches_the_run_folder(tmp_path):
    from fedprefix.common.errors import ConfigError
    from fedprefix.coordinator.simulate import simulate

    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="does not exist"):
        simulate(FederationConfig(base=str(tmp_path / "no-base"), run_dir=str(run_dir)))
    assert not run_dir.exists()


def test_simulate_runs_flower_with_the_plan_for_this_machine(tmp_path, monkeypatch):
    from fedprefix.common import base_checks
    from fedprefix.coordinator import simulate as simulate_module

    plans = []
    monkeypatch.setattr(simulate_module, "usable_cores", lambda: 16)
    monkeypatch.setattr(simulate_module, "available_memory", lambda: 6 * GIB)
    monkeypatch.setattr(base_checks, "parameter_count", lambda name: BUILT_IN)
    monkeypatch.setattr(simulate_module, "_run_federation", lambda *args: plans.append(args[3]) or 1)
    config = FederationConfig(num_users=4, run_dir=str(tmp_path / "run"))
    for cpus, plan in ((None, NodePlan(cpus=8, at_once=2)), (4, NodePlan(cpus=4, at_once=4))):
        with pytest.raises(simulate_module.SimulationError, match="did not start"):
            simulate_module.simulate(config, cpus_per_client=cpus)
        assert plans.pop() == plan
