"""Federated runs through `flwr run` on a local SuperLink, tiny models: what crosses the
wire (from the nodes' audit logs), round records, modes, DP, nodes that fail, and your own data."""

from __future__ import annotations

import base64
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from fedprefix.client import Personalizer
from fedprefix.client.node import simulation_key
from fedprefix.common.base_model import load_base
from fedprefix.common.config import FederationConfig
from fedprefix.common.prefix import Prefix, PrefixConfig
from fedprefix.common.protocol import shared_store_id
from fedprefix.common.store import PrefixStore
from fedprefix.coordinator import cli
from fedprefix.coordinator.cli import main as cli_main
from fedprefix.coordinator.records import load_shared_prefix, read_run
from fedprefix.coordinator.simulate import simulate
from fedprefix.coordinator.views import round_line, rounds_table
from rich.console import Console

from tests.conftest import MARK, federation_config, marked_processes

METRICS_PER_REPLY = 5  # num-examples, train-loss, train-seconds, steps, dp-weight


def _sent(config: FederationConfig) -> list[dict]:
    """Every reply any node sent, from the nodes' audit logs."""
    lines = []
    for path in sorted(Path(config.audit_dir).glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def test_personal_prefixes_never_leave_the_device(tmp_path, monkeypatch):
    config = federation_config(tmp_path)
    # user002 "lost" its key: its store holds a prefix under another key.
    base = load_base("tiny-llama")
    stray = Prefix(PrefixConfig(spec=base.prefix_spec(4), base_fingerprint=base.fingerprint))
    PrefixStore(tmp_path / "stores" / "user002").save("user002", stray, b"\x01" * 32)
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)  # inherited by every process simulate starts

    rounds = simulate(config)

    assert not marked_processes(mark), "simulate must stop every process it started"
    info, recorded, problems = read_run(config.run_dir)
    assert info.status == "finished" and not problems and [r.round for r in recorded] == [1, 2]
    assert info.compute_dtype in ("float32", "bfloat16") and info.host["cores"] >= 1  # run.json names its host
    for record in rounds:
        assert record.replies_accepted == 2 and record.replies_rejected == 1
        assert any("wrong key" in r.reason for r in record.rejected), record.rejected
        assert record.eval_loss_personal is not None and record.shared_update_norm > 0
    # What crossed the wire: shared arrays and scalar metrics only.
    sent = _sent(config)
    shared_bytes = 4 * base.prefix_spec(4).flat_dim * 4
    train_replies = [s for s in sent if s["type"] == "train"]
    assert len(train_replies) == 4  # 2 healthy users x 2 rounds
    for reply in train_replies:
        assert [a["name"] for a in reply["arrays"]] == ["shared.embedding.weight"]
        data = sum(len(base64.b64decode(a["data"])) for a in reply["arrays"])
        assert data + 8 * len(reply["metrics"]) == shared_bytes + 8 * METRICS_PER_REPLY
        assert not reply["configs"]
    assert rounds[0].uplink_bytes == 2 * (shared_bytes + 8 * METRICS_PER_REPLY)
    assert all(not s["arrays"] for s in sent if s["type"] == "evaluate")
    blob = b"".join(base64.b64decode(a["data"]) for s in sent for a in s["arrays"])
    for user in ("user000", "user001"):
        store = PrefixStore(tmp_path / "stores" / user)
        personal = store.load(user, simulation_key(config, user), base.fingerprint)
        values = personal.flat().detach().numpy().astype(np.float32)
        assert not np.allclose(values, 0)
        for row in values:  # no personal row's bytes appear in anything sent
            assert row.tobytes()[:64] not in blob
        raw = store.path_for(user).read_bytes()
        assert values.tobytes()[:64] not in raw, "the store must hold ciphertext only"


def test_personal_mode_sends_no_arrays(tmp_path, monkeypatch):
    config = federation_config(tmp_path, mode="personal", num_users=2, num_rounds=1)
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    sessions = []

    def ray_sessions(record):  # while the run's Ray lives: where its session folder is
        folders = {p.environ().get("RAY_TMPDIR") for p in marked_processes(mark) if "raylet" in p.name()}
        sessions.extend(session for folder in folders if folder for session in Path(folder, "ray").glob("session_2*"))

    (record,) = simulate(config, on_round=ray_sessions)
    # Ray's session folder (its logs quote nodes' warnings) was the run's own, and went with it:
    # every run had left one in /tmp/ray
    assert sessions and not any(session.exists() for session in sessions), sessions
    sent = _sent(config)
    assert len(sent) == 4 and all(not s["arrays"] for s in sent)
    assert record.shared_update_norm is None and record.replies_accepted == 2
    assert record.eval_loss_personal < record.eval_loss_base
    assert record.uplink_bytes == 2 * 8 * METRICS_PER_REPLY
    # the run's files are its owner's alone: a node's traceback in flower.log may quote its data
    records = [path for path in Path(config.run_dir).iterdir() if not path.name.startswith(".")]  # not its marker, lock
    modes = {path.name: path.stat().st_mode & 0o777 for path in records}
    assert {"run.json", "rounds.jsonl", "flower.log"} <= set(modes) and set(modes.values()) == {0o600}, modes


def test_shared_rounds_then_a_personal_round(tmp_path):
    """shared-only-rounds 1, personal-only-rounds 1 ([shared ; personal]): round 1 trains and sends
    the shared part only (personal stays at its start), round 2 trains the personal part against
    the final shared prefix and sends nothing shared, so the run's shared prefix is round 1's aggregate."""
    config = federation_config(tmp_path, num_users=2, shared_only_rounds=1, personal_only_rounds=1)
    first, second = simulate(config)
    train = [s for s in _sent(config) if s["type"] == "train"]
    assert [bool(s["arrays"]) for s in train] == [True, False] * 2  # each node's log: round 1, round 2
    assert first.shared_update_norm > 0 and second.shared_update_norm is None
    assert second.replies_accepted == 2 and second.uplink_bytes == 2 * 8 * METRICS_PER_REPLY
    assert second.eval_loss_shared == pytest.approx(first.eval_loss_shared, rel=1e-6)  # shared unchanged
    assert second.eval_loss_personal < first.eval_loss_personal  # the personal part trained in round 2


def test_default_recipe_each_user_fine_tunes_a_copy_of_the_shared_prefix(tmp_path):
    """personal-init "shared" (the default): rounds 1-2 federate the shared part alone, round 3
    copies it on each node and fine-tunes the copy, which replaces it in the user's prefix: the
    store holds that copy only, it starts where the federation ended, and it never crosses the wire."""
    config = federation_config(tmp_path, num_users=2, num_rounds=3, personal_init="shared", copy_learning_rate=0.02)
    assert [config.round_parts(r) for r in (1, 2, 3)] == ["shared", "shared", "personal"]
    rounds = simulate(config)
    train = [s for s in _sent(config) if s["type"] == "train"]
    assert [bool(s["arrays"]) for s in train] == [True, True, False] * 2  # each node's log, rounds 1-3
    assert rounds[2].shared_update_norm is None and rounds[2].uplink_bytes == 2 * 8 * METRICS_PER_REPLY
    # before the copy a user's prefix is the shared one; after it, the trained copy does better
    assert rounds[1].eval_loss_personal == pytest.approx(rounds[1].eval_loss_shared, rel=1e-6)
    assert rounds[2].eval_loss_personal < rounds[2].eval_loss_shared
    base = load_base("tiny-llama")
    shared = Prefix.from_state(
        PrefixConfig(spec=base.prefix_spec(4), base_fingerprint=base.fingerprint), load_shared_prefix(config.run_dir)
    ).flat()
    blob = b"".join(base64.b64decode(a["data"]) for s in _sent(config) for a in s["arrays"])
    for user in ("user000", "user001"):
        store = PrefixStore(tmp_path / "stores" / user)
        assert not store.exists(shared_store_id(user)), "a copy replaces the shared part: nothing to join in front"
        me = Personalizer.load(user, store, simulation_key(config, user), base_model=base)
        assert me.shared is None and me.key_values().shape[3] == 4  # the row prefix is the copy alone
        copy = me.personal.flat().detach()
        assert 0 < (copy - shared).abs().max() < 0.5  # fine-tuned from the federation's end point
        for row in copy.numpy().astype(np.float32):
            assert row.tobytes()[:64] not in blob


def test_dp_run_reports_privacy_spent(tmp_path):
    config = federation_config(tmp_path, num_users=2, dp_noise_multiplier=0.5, dp_clipping_norm=5.0, audit_dir="")
    rounds = simulate(config)
    epsilons = [r.privacy.epsilon for r in rounds]
    assert all(e is not None and np.isfinite(e) for e in epsilons) and epsilons[1] > epsilons[0]
    assert rounds[-1].privacy.noise_multiplier == 0.5
    replaced = rounds[-1].privacy.epsilon_replace_one
    assert replaced > epsilons[-1]  # figures checked against the accountant in test_strategy
    shown = round_line(rounds[-1], len(rounds))  # what `fedprefix simulate` prints as each round ends
    assert shown.endswith(
        f", DP epsilon {epsilons[-1]:.3g} at delta 1e-05 ({replaced:.3g} if one user's data is replaced)"
    ), shown
    console = Console(width=200, record=True)
    console.print(rounds_table(rounds))
    table = console.export_text()
    assert "DP eps" in table and f"{epsilons[-1]:.3f}" in table, table


def test_own_jsonl_file_one_node_per_user_k_users_per_round(tmp_path, monkeypatch, capsys):
    """`fedprefix simulate --data FILE --users-per-round 2`: 5 users of one file, 2 trained and evaluated a round."""
    users = ["ann", "ben", "cat", "dan", "eve"]
    rows = [{"user": u, "prompt": f"Say hi to {u} ({i})", "completion": f"Hi {u}!"} for i in range(6) for u in users]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(max_length=96, batch_size=4, personal_tokens=4, shared_tokens=4)
    argv = ["simulate", "--data", str(tmp_path / "log.jsonl"), "--users-per-round", "2", "--rounds", "2"]
    argv += ["--local-steps", "2", "--out", str(tmp_path / "run"), "--json"]
    argv += ["--set", f"store-root={tmp_path / 'stores'}", "--set", f"audit-dir={tmp_path / 'audit'}"]
    argv += [f"--set={k.replace('_', '-')}={v}" for k, v in settings.items()]
    monkeypatch.setattr(sys, "argv", ["fedprefix", *argv])
    monkeypatch.setitem(cli_main._state, "debug", False)
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code in (0, None), capsys.readouterr().err
    records = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert len(set(record["sampled_users"])) == 2 and record["replies_accepted"] == 2
        assert record["eval_loss_personal"] is not None
    info, _, _ = read_run(tmp_path / "run")
    assert info.config["num_users"] == 5 and info.config["users_per_round"] == 2
    logged = {
        path.stem: [json.loads(line) for line in path.read_text().splitlines()]
        for path in (tmp_path / "audit").glob("*.jsonl")
    }
    assert set(logged) <= set(users), "nodes are named by the file's user ids"
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "audit", *(tmp_path / "audit").glob("*.jsonl"))}
    assert modes == {"0o700", "0o600"}, "an audit log holds its user's replies: theirs alone"
    for server_round in (1, 2):  # (round 2, the secure one, takes 5 training messages per user)
        for kind in ("train", "evaluate"):
            repliers = {
                u for u, entries in logged.items() for e in entries if (e["round"], e["type"]) == (server_round, kind)
            }
            assert len(repliers) == 2, (server_round, kind, repliers)


def test_interpolate_recipe_keeps_each_update_secret_and_each_user_near_the_average(tmp_path):
    """personal-init "interpolate": rounds 1-2 federate the shared part in the clear; round 3
    goes through SecAgg+: the nodes' replies carry masked vectors, no arrays; the coordinator
    applies the average of the users' round results L_i, and each user keeps
    S + a (L_i - S). So the users' kept prefixes average back to S exactly (equal weights
    here), each differs from S, and none of their bytes crossed the wire."""
    config = federation_config(tmp_path, num_users=3, num_rounds=3, personal_init="interpolate", interpolation=0.25)
    rounds = simulate(config)
    info, recorded, problems = read_run(config.run_dir)
    assert info.status == "finished" and not problems, problems
    assert [r.replies_accepted for r in rounds] == [3, 3, 3] and not any(r.rejected for r in rounds)
    assert rounds[2].shared_update_norm > 0  # the secure average was applied
    assert rounds[2].uplink_bytes > 3 * 8 * METRICS_PER_REPLY  # masked vectors and keys went up
    train = [s for s in _sent(config) if s["type"] == "train"]
    assert all(not s["arrays"] for s in train if s["configs"]), "a secure reply carries no plain arrays"
    masked = [s for s in train if any("masked_params" in c for c in s["configs"])]
    assert len(masked) == 3
    base = load_base("tiny-llama")
    spec = PrefixConfig(spec=base.prefix_spec(4), base_fingerprint=base.fingerprint)
    shared = Prefix.from_state(spec, load_shared_prefix(config.run_dir)).flat().detach()
    blob = b"".join(base64.b64decode(a["data"]) for s in _sent(config) for a in s["arrays"])
    blob += json.dumps([s["configs"] for s in _sent(config)]).encode()
    kept = []
    for user in ("user000", "user001", "user002"):
        me = Personalizer.load(
            user, PrefixStore(tmp_path / "stores" / user), simulation_key(config, user), base_model=base
        )
        own = me.personal.flat().detach()
        assert me.shared is None and 0 < (own - shared).abs().max() < 0.5
        for row in own.numpy().astype(np.float32):
            assert row.tobytes()[:64] not in blob
            assert base64.b64encode(row.tobytes()[:48]) not in blob
        kept.append(own)
    # sum_i (P_i - S) = a sum_i (L_i - S) = a (sum_i (L_i - S_prev) - 3 (S - S_prev)) = 0
    assert torch.stack(kept).mean(0).sub(shared).abs().max() < 1e-6
