"""Where a node's rows come from: its own files, or its user's share of the run's data.

- A real device names its files in its node config: `data-path` (a .jsonl, .json, .csv or .parquet
  file of rows `fit` accepts) and optionally `eval-path` (held-out rows; without it the
  held-out rule of client/partition.py splits the `data-path` rows).
- Otherwise the run setting `data` holds every user's rows, and node partition-id i is the
  i-th user there (client/partition.py: natural-id partitioning, one node per user).

A node with neither refuses to train: nothing is ever made up for it.
"""

from __future__ import annotations

from fedprefix.common.config import FederationConfig
from fedprefix.common.errors import ConfigError, DataError

from .data import Row, read_file_rows
from .partition import partition_users, split_held_out, user_split


def node_partition(node_config: dict) -> int:
    """The node config's partition-id (0 where it has none), a whole number or a ConfigError naming it."""
    value = node_config.get("partition-id", 0)
    try:
        if isinstance(value, bool) or int(value) != float(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config partition-id {value!r} must be a whole number") from None


def node_user_id(node_config: dict, config: FederationConfig) -> str:
    """The node's user: `user-id` from its node config, else its partition's user in the run's data, else user<N>."""
    if "user-id" in node_config:
        return str(node_config["user-id"])
    partition = node_partition(node_config)
    if config.data and "data-path" not in node_config:
        users = partition_users(config.data, config.user_field, config.min_rows)
        if not 0 <= partition < len(users):
            raise DataError(
                f"partition-id {partition}, but the data {config.data} has {len(users)} users "
                f"(with min-rows {config.min_rows}): partition ids run from 0 to {len(users) - 1}"
            )
        return users[partition]
    return f"user{partition:03d}"


def node_rows(node_config: dict, config: FederationConfig, user_id: str) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) of this node's user; raises DataError naming what is missing."""
    if "data-path" in node_config:
        rows = read_file_rows(str(node_config["data-path"]))
        if "eval-path" in node_config:
            return rows, read_file_rows(str(node_config["eval-path"]))
        return split_held_out(rows, config.eval_fraction, user_id)
    if config.data:
        return user_split(config.data, user_id, config.user_field, config.min_rows, config.eval_fraction)
    raise DataError(
        f"user {user_id}: this node has no data; give it `data-path` in its node config "
        "(flower-supernode --node-config \"data-path='rows.jsonl'\") or the run its data (run setting `data`)"
    )
