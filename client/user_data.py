"""Where a node's rows come from: its own files, or its user's folder in a federation data folder.

A federation data folder holds one sub-folder per user, named by the user id:

    DATA/alice/train.jsonl   rows in any form `fit` accepts (client/data.py)
    DATA/alice/eval.jsonl    held-out rows for evaluation rounds (optional: train rows then)

Node partition-id i is the i-th user in name order: one node per distinct user, the
semantics of flwr-datasets' NaturalIdPartitioner. On a real device the node config
names the files instead (`data-path`, `eval-path`). A node with neither refuses to
train: nothing is ever made up for it.
"""

from __future__ import annotations

from pathlib import Path

from fedprefix.common.errors import DataError

from .data import Row, read_rows

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"


def folder_users(data: str | Path) -> list[str]:
    """The user ids of a federation data folder, in partition order."""
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"federation data folder {folder} does not exist")
    users = sorted(p.name for p in folder.iterdir() if (p / TRAIN_FILE).is_file())
    if not users:
        raise DataError(f"federation data folder {folder} has no user folders with a {TRAIN_FILE}")
    return users


def node_user_id(node_config: dict, data: str = "") -> str:
    """The node's user: `user-id` from its node config, else the partition's user in `data`, else user<partition-id>."""
    if "user-id" in node_config:
        return str(node_config["user-id"])
    partition = int(node_config.get("partition-id", 0))
    if data and "data-path" not in node_config:
        users = folder_users(data)
        if not 0 <= partition < len(users):
            raise DataError(f"partition-id {partition}, but the data folder {data} has {len(users)} users")
        return users[partition]
    return f"user{partition:03d}"


def node_rows(node_config: dict, data: str, user_id: str) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) of this node's user; raises DataError naming what is missing."""
    if "data-path" in node_config:
        train_path = str(node_config["data-path"])
        eval_path = str(node_config.get("eval-path", train_path))
    elif data:
        folder = Path(data) / user_id
        train_path = str(folder / TRAIN_FILE)
        eval_path = str(folder / EVAL_FILE) if (folder / EVAL_FILE).is_file() else train_path
    else:
        raise DataError(
            f"user {user_id}: this node has no data; give it `data-path` in its node config "
            "(flower-supernode --node-config \"data-path='rows.jsonl'\") or the run a data folder (run setting `data`)"
        )
    train_rows = read_rows(train_path)
    if not train_rows:
        raise DataError(f"user {user_id} has no training data in {train_path}")
    return train_rows, read_rows(eval_path)
