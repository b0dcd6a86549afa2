"""An on-device audit log of every reply a node sends: what left the device, byte for byte.

Turned on by the run setting `audit-dir`: each reply becomes one JSON line in
`<audit-dir>/<user>.jsonl` with the message type, every array's name, shape, dtype and
data (base64), and every metric. The log stays on the node; it is how a user (and the
privacy test) can check that no personal prefix was ever sent.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from fedprefix.common.config import FederationConfig
from fedprefix.common.protocol import CONFIG
from flwr.app import ConfigRecord, Context, Message


def _jsonable(value):
    """A config value as JSON: bytes (SecAgg+ keys, shares and masked vectors) as base64."""
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    return value


def _group_round(group_id: str) -> int | None:
    return int(group_id) if group_id.isdigit() else None


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: pass the message on, log the reply if the run asks for it."""
    reply = call_next(msg, context)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    folder = str(context.run_config.get("audit-dir", ""))  # a run setting, read from the node's own context
    if not folder or reply.has_error():
        return reply
    arrays = [
        {
            "record": rname,
            "name": name,
            "shape": list(a.shape),
            "dtype": a.dtype,
            "data": base64.b64encode(a.numpy().tobytes()).decode(),
        }
        for rname, record in reply.content.array_records.items()
        for name, a in record.items()
    ]
    metrics = {k: v for record in reply.content.metric_records.values() for k, v in record.items()}
    entry = {
        "type": msg.metadata.message_type,
        # a secure round's messages carry the round as their group id only (Flower's SecAgg+)
        "round": config.get("server-round") or _group_round(msg.metadata.group_id),
        "arrays": arrays,
        "metrics": metrics,
        "configs": [{k: _jsonable(v) for k, v in r.items()} for r in reply.content.config_records.values()],
    }
    from .user_data import node_user_id  # reads the run's data: only where the run audits

    user = node_user_id(dict(context.node_config), FederationConfig.from_run_config(dict(context.run_config)))
    # the user's replies byte for byte (updates derived from their rows, SecAgg+ shares): theirs alone
    Path(folder).mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(Path(folder) / f"{user}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with open(fd, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return reply
