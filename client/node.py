"""One federated node = one user: its base, data, encrypted store, key and Personalizer.

The ClientApp's handlers stay thin; everything they share is set up here once per
message. In deployment each message runs in a fresh process, so this must be quick:
the base loads from the converted safetensors cache (well under a second).

Node settings (``--node-config`` of ``flower-supernode``; simulation sets ``partition-id``):
- ``partition-id``: which user of the run's data this node is (client/partition.py);
- ``user-id``: the user's id (default: that user's id in the run's data, else ``user<partition-id>``);
- ``data-path`` / ``eval-path``: the user's rows on this device, .jsonl, .json, .csv or .parquet
  (client/user_data.py; no data: refused);
- ``store``: the encrypted store folder (default ``<store-root>/<user-id>``, and with no
  store-root set ``<run-dir>/stores/<user-id>``);
- ``key-file``: 32 raw bytes or 64 hex digits; required where the node names files of its own.
  A simulated node (only ``partition-id``) derives a key from the run's ``key-seed``,
  which is only fit for simulations.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from fedprefix.common.base_model import BaseModelHandle, load_base
from fedprefix.common.config import FederationConfig
from fedprefix.common.errors import ConfigError, ShapeError
from fedprefix.common.protocol import RoundSettings, pack_shared, unpack_shared
from fedprefix.common.store import BadKeyError
from fedprefix.common.store.key_files import read_key_file
from flwr.app import ArrayRecord

from .personalizer import Personalizer
from .user_data import node_partition, node_rows, node_user_id

log = logging.getLogger(__name__)

_BASES: dict[str, BaseModelHandle] = {}  # Flower reuses simulation processes: load each base once


def use_cpu_share() -> int:
    """Inside a Ray actor (Flower's simulation engine), compute on as many threads as CPUs the
    actor was given (`client-resources-num-cpus`), so that nodes sharing a machine do not
    oversubscribe its cores; elsewhere leave torch's setting alone. Returns the thread count."""
    ray = sys.modules.get("ray")  # imported by the simulation engine, never by a deployed node
    if ray is not None and ray.is_initialized():
        share = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if share and torch.get_num_threads() != max(1, int(share)):
            torch.set_num_threads(max(1, int(share)))
    return torch.get_num_threads()


def cached_base(name: str) -> BaseModelHandle:
    """The base `name`, loaded once per process."""
    use_cpu_share()
    if name not in _BASES:
        _BASES[name] = load_base(name)
    return _BASES[name]


@dataclass
class Node:
    """Everything a node needs for one message."""

    config: FederationConfig
    user_id: str
    personalizer: Personalizer
    train_rows: list
    eval_rows: list

    def receive_shared(self, arrays: ArrayRecord | None, fingerprint: str | None) -> None:
        """Take the coordinator's shared prefix; refuse one made for another base, of another shape, or not finite."""
        if fingerprint is not None and fingerprint != self.personalizer.base.fingerprint:
            raise ConfigError(
                f"user {self.user_id}: the coordinator's shared prefix is for base {fingerprint[:12]}…, "
                f"this node runs {self.personalizer.base.fingerprint[:12]}…"
            )
        shared = self.personalizer.shared
        if shared is None or arrays is None or len(arrays) == 0:
            return
        expected = {k: tuple(v.shape) for k, v in shared.state_tensors().items()}
        try:
            received = unpack_shared(arrays, expected)
        except ShapeError as exc:
            raise ShapeError(f"user {self.user_id}: {exc}") from None
        with torch.no_grad():
            for name, tensor in shared.state_dict().items():
                tensor.copy_(received[name])

    def train_round(self, settings: RoundSettings):
        """Fit the round's parts on the node's rows and save (a FitReport).

        Node stores outlive a run: under a recipe that copies the shared prefix, a user may hold
        an earlier run's copy, which replaced the shared part. This run's shared rounds then
        train its shared prefix with that copy set aside (still the user's served prefix), and
        its first personal round copies this run's shared prefix afresh, as a first run does."""
        me = self.personalizer
        parts = settings.train_parts if self.config.mode == "shared+personal" else "all"
        earlier_copy = None
        if self.config.copies_shared and me.copy_replaces_shared:
            if parts == "shared":
                earlier_copy, me.personal = me.personal, None
            elif settings.server_round == self.config.shared_only_count() + 1:
                me.personal = None  # the copy round: fit copies the shared prefix it received
        try:
            report = me.fit(
                self.train_rows,
                max_steps=self.config.local_steps,
                learning_rate=settings.learning_rate or self.config.learning_rate,
                proximal_mu=settings.proximal_mu,
                parts=parts,
            )
        finally:
            if earlier_copy is not None:
                me.personal = earlier_copy
        me.save()
        return report

    def shared_arrays(self) -> dict[str, torch.Tensor]:
        """The shared prefix as it goes on the wire (empty when this mode sends nothing)."""
        shared = self.personalizer.shared
        if shared is None or not self.config.sends_shared:
            return {}
        return pack_shared(shared.state_tensors())


# what a node config may hold: Flower's simulation sets the first two, a device's owner the rest
NODE_CONFIG_KEYS = {"partition-id", "num-partitions", "user-id", "data-path", "eval-path", "key-file", "store"}


def simulation_key(config: FederationConfig, user_id: str) -> bytes:
    """A per-user key derived from the run's key seed: for simulations only."""
    return hmac.new(config.key_seed.encode(), user_id.encode(), hashlib.sha256).digest()


# node config keys that make a node a real device, with files of its own: it must bring its key
DEVICE_KEYS = ("user-id", "data-path", "eval-path", "store")


def node_key(node_config: dict, config: FederationConfig, user_id: str) -> bytes:
    """The node's store key: its `key-file`'s; a simulated node (no files of its own) derives
    one from the run's `key-seed`, which the coordinator and anyone with the run's settings
    know, so a device that names its own files without a key file is refused."""
    if "key-file" in node_config:
        try:
            return read_key_file(node_config["key-file"])
        except BadKeyError as exc:
            raise ConfigError(f"node config key-file: {exc}") from None
    if own := [name for name in DEVICE_KEYS if name in node_config]:
        raise ConfigError(
            f"node config names this device's own {', '.join(own)} but no key-file: without one its store would be "
            "encrypted under a key derived from the run's key-seed, which the coordinator knows; give key-file "
            "(32 random bytes, e.g. head -c 32 /dev/urandom > KEY && chmod 600 KEY)"
        )
    return simulation_key(config, user_id)


def open_node(run_config: dict, node_config: dict) -> Node:
    """Set up the node for one message from the run's settings (its `context.run_config`) and its node config."""
    config = FederationConfig.from_run_config(run_config)
    if unknown := sorted(set(node_config) - NODE_CONFIG_KEYS):  # a misspelled key is otherwise silently unused
        log.warning(
            "node config keys not read by fedprefix: %s (it reads %s)",
            ", ".join(unknown),
            ", ".join(sorted(NODE_CONFIG_KEYS)),
        )
    partition = node_partition(node_config)
    user_id = node_user_id(node_config, config)
    key = node_key(node_config, config, user_id)
    train_rows, eval_rows = node_rows(node_config, config, user_id)
    store = node_config.get("store") or str(Path(config.node_store_root) / user_id)
    personalizer = Personalizer(
        base_model=cached_base(config.base),
        user_id=user_id,
        store=store,
        key=key,
        num_virtual_tokens=config.personal_tokens if config.trains_personal else 0,
        shared_virtual_tokens=config.shared_tokens if config.sends_shared else 0,
        prefix_projection=config.personal_projection,
        personal_from_shared=config.copies_shared,
        progress=False,
        batch_size=config.batch_size,
        max_length=config.max_length,
        dtype=config.dtype,
        eval_fraction=0.0,  # the node's held-out rows are evaluated in evaluation rounds
        seed=config.data_seed + partition,
    )
    personalizer.restore()  # this user's prefixes from the encrypted store, if any
    return Node(config, user_id, personalizer, train_rows, eval_rows)
