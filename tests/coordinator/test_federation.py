"""Federated runs in Flower's simulation runtime on tiny models: what crosses the wire,
round records, modes, DP, and nodes that fail."""

from __future__ import annotations

import pickle
import uuid

import numpy as np
from fedprefix.client import app as client_module
from fedprefix.client.node import simulation_key
from fedprefix.common.base_model import load_base
from fedprefix.common.config import FederationConfig
from fedprefix.common.prefix import Prefix, PrefixConfig
from fedprefix.common.store import PrefixStore
from fedprefix.coordinator.records import read_run
from fedprefix.coordinator.simulate import simulate
from flwr.clientapp import ClientApp


def recording_client_app(record_dir) -> ClientApp:
    """The real ClientApp plus a mod that keeps a copy of every reply a node sends."""

    def record(msg, context, call_next):
        reply = call_next(msg, context)
        if not reply.has_error():
            arrays = {
                name: array.numpy().tobytes()
                for record in reply.content.array_records.values()
                for name, array in record.items()
            }
            metrics = {k: v for r in reply.content.metric_records.values() for k, v in r.items()}
            (record_dir / f"{uuid.uuid4().hex}.pkl").write_bytes(
                pickle.dumps((msg.metadata.message_type, arrays, metrics))
            )
        return reply

    wrapped = ClientApp(mods=[record, client_module.dp_clipping_mod])
    wrapped.train()(client_module.train)
    wrapped.evaluate()(client_module.evaluate)
    return wrapped


def _config(tmp_path, **settings) -> FederationConfig:
    defaults = dict(
        base="tiny-llama",
        num_users=3,
        num_rounds=2,
        local_steps=2,
        examples_per_user=10,
        max_length=96,
        batch_size=4,
        personal_tokens=4,
        shared_tokens=4,
        eval_size=4,
        run_dir=str(tmp_path / "run"),
        store_root=str(tmp_path / "stores"),
    )
    return FederationConfig(**{**defaults, **settings})


def _sent(record_dir):
    return [pickle.loads(p.read_bytes()) for p in record_dir.glob("*.pkl")]


def test_personal_prefixes_never_leave_the_device(tmp_path):
    record_dir = tmp_path / "wire"
    record_dir.mkdir()
    config = _config(tmp_path)
    # user002 "lost" its key: its store holds a prefix under another key.
    base = load_base("tiny-llama")
    stray = Prefix(PrefixConfig(spec=base.prefix_spec(4), base_fingerprint=base.fingerprint))
    PrefixStore(tmp_path / "stores" / "user002").save("user002", stray, b"\x01" * 32)

    rounds = simulate(config, client_app=recording_client_app(record_dir))

    info, recorded, problems = read_run(config.run_dir)
    assert info.status == "finished" and not problems and [r.round for r in recorded] == [1, 2]
    for record in rounds:
        assert record.replies_accepted == 2 and record.replies_rejected == 1
        assert any("wrong key" in r.reason for r in record.rejected), record.rejected
        assert record.eval_loss_personal is not None and record.shared_update_norm > 0
    # What crossed the wire: shared arrays and scalar metrics only.
    sent = _sent(record_dir)
    shared_bytes = 4 * base.prefix_spec(4).flat_dim * 4
    train_replies = [s for s in sent if s[0] == "train"]
    assert len(train_replies) == 4  # 2 healthy users x 2 rounds
    for _, arrays, metrics in train_replies:
        assert list(arrays) == ["shared.embedding.weight"]
        assert sum(len(b) for b in arrays.values()) + 8 * len(metrics) == shared_bytes + 8 * 5
    assert rounds[0].uplink_bytes == 2 * (shared_bytes + 8 * 5)
    assert all(not arrays for kind, arrays, _ in sent if kind == "evaluate")
    blob = b"".join(b for _, arrays, _ in sent for b in arrays.values())
    for user in ("user000", "user001"):
        store = PrefixStore(tmp_path / "stores" / user)
        personal = store.load(user, simulation_key(config, user), base.fingerprint)
        values = personal.flat().detach().numpy().astype(np.float32)
        assert not np.allclose(values, 0)
        for row in values:  # no personal row's bytes appear in anything sent
            assert row.tobytes()[:64] not in blob
        raw = store.path_for(user).read_bytes()
        assert values.tobytes()[:64] not in raw, "the store must hold ciphertext only"


def test_personal_mode_sends_no_arrays(tmp_path):
    record_dir = tmp_path / "wire"
    record_dir.mkdir()
    config = _config(tmp_path, mode="personal", num_users=2, num_rounds=1)
    (record,) = simulate(config, client_app=recording_client_app(record_dir))
    assert all(not arrays for _, arrays, _ in _sent(record_dir))
    assert record.shared_update_norm is None and record.replies_accepted == 2
    assert record.eval_loss_personal < record.eval_loss_base
    assert record.uplink_bytes == 2 * 8 * 5


def test_dp_run_reports_privacy_spent(tmp_path):
    config = _config(tmp_path, num_users=2, dp_noise_multiplier=0.5, dp_clipping_norm=5.0)
    rounds = simulate(config)
    epsilons = [r.privacy.epsilon for r in rounds]
    assert all(e is not None and np.isfinite(e) for e in epsilons) and epsilons[1] > epsilons[0]
    assert rounds[-1].privacy.noise_multiplier == 0.5
