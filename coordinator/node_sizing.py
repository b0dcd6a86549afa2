"""How many simulated nodes train at once on this machine, and how many CPUs each gets.

Flower's simulation engine keeps a pool of Ray actors, one per `client-resources-num-cpus`
share of Ray's CPUs, whatever the number of nodes; each actor that runs a node loads its own
copy of the base. So a node's CPUs decide both its torch threads and how many copies of the
base are in memory at once. They are the machine's cores shared among the nodes of one round,
and more each where memory holds fewer copies of the base than that: a 16-core machine with
6 GiB free runs 2 nodes of the built-in base at a time on 8 threads each, not 4 nodes that
run out of memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedprefix.common.config import FederationConfig

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Measured on the 2-core EPYC (cgroup memory peaks, page cache included, of `fedprefix simulate`
# with 4 users, 1 round, 1 and 2 nodes at once, bfloat16 nodes): a second node added 0.41 GiB
# with tiny-llama and 1.20 GiB with the built-in base, so 6.3 bytes per parameter of the
# built-in base's 134.5 M beyond tiny-llama (a bfloat16 copy, a training step's activations;
# the float32 weights are read from the page cache the nodes share). The rest of a run (the
# ServerApp with the base in float32, Ray) took 1.01 GiB and 1.56 GiB beside the CLI's own
# 0.26 GiB, which the free memory counted at planning time already leaves out: 4.4 bytes per
# parameter. The constants below leave some room above that.
NODE_BYTES = GIB // 2
NODE_BYTES_PER_PARAMETER = 8
RESERVED_BYTES = 5 * GIB // 4
RESERVED_BYTES_PER_PARAMETER = 5


def node_memory(parameters: int) -> int:
    """Estimated peak bytes of one training node's process for a base of `parameters`."""
    return NODE_BYTES + NODE_BYTES_PER_PARAMETER * parameters


def nodes_in_memory(parameters: int, available: int) -> int:
    """How many training nodes of that base fit in `available` bytes beside the rest of a run (0: none)."""
    room = available - RESERVED_BYTES - RESERVED_BYTES_PER_PARAMETER * parameters
    return max(0, room // node_memory(parameters))


@dataclass(frozen=True)
class NodePlan:
    """How a simulation runs its nodes on this machine."""

    cpus: int  # Ray CPUs (and torch threads) per node: client-resources-num-cpus
    at_once: int  # nodes that train at once: Flower's pool of Ray actors

    def federation_config(self, config: FederationConfig) -> str:
        """`flwr run --federation-config`: the nodes, each node's CPUs, and Ray's CPUs: those of
        `at_once` nodes, so that Flower's pool (Ray CPUs / node CPUs actors) is no larger. Ray is
        told, as it reads a container's CPU quota only at the cgroup root."""
        return (
            f"num-supernodes={config.num_users} client-resources-num-cpus={self.cpus} "
            f"init-args-num-cpus={self.cpus * self.at_once}"
        )


def plan_nodes(
    config: FederationConfig, cores: int, nodes_fitting: int | None = None, cpus: int | None = None
) -> NodePlan:
    """As many nodes at once as one round has, the cores and memory allow (`nodes_fitting`; None:
    not known), at least one; the cores shared among them (or `cpus` each where given).

    One CPU per node made 64 actors (64 copies of the base) on a 64-core host for a round of 4,
    each on one thread; now they are 4 actors on 16 threads each."""
    at_once = max(config.round_sizes)
    if nodes_fitting is not None:
        at_once = min(at_once, nodes_fitting)
    if cpus is None:
        at_once = max(1, min(at_once, cores))
        return NodePlan(cpus=max(1, cores // at_once), at_once=at_once)
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:  # Flower takes whole CPUs only
        raise ValueError(f"CPUs per node must be a whole number, at least 1; got {cpus!r}")
    return NodePlan(cpus=cpus, at_once=max(1, min(at_once, cores // cpus)))


def plan_for_machine(config: FederationConfig, cores: int, parameters: int, available: int | None) -> NodePlan:
    """plan_nodes for this machine's `cores` and `available` memory (None: not known), with a
    warning where memory, not the cores, decides how many nodes train at once."""
    fitting = None if available is None else nodes_in_memory(parameters, available)
    plan = plan_nodes(config, cores, fitting)
    if fitting is not None and fitting < min(max(config.round_sizes), cores):
        logger.warning(
            "about %.1f GiB of memory is free and a training node of %s takes about %.1f GiB: %d of a "
            "round's %d nodes train at once, on %d CPUs each%s",
            available / GIB,
            config.base,
            node_memory(parameters) / GIB,
            plan.at_once,
            max(config.round_sizes),
            plan.cpus,
            "; the estimate leaves room for none, so the run may be stopped for lack of memory" if fitting == 0 else "",
        )
    return plan
