"""Node set-up for the ClientApp: data, keys, and refusing another base's shared prefix."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from fedprefix.client.node import open_node, simulation_key
from fedprefix.common.errors import ConfigError, DataError, ShapeError
from fedprefix.common.store import BadKeyError
from fedprefix.common.store.key_files import read_key_file, write_key_file
from flwr.app import Array, ArrayRecord

from tests.conftest import federation_config


def _settings(tmp_path, **kw) -> dict:
    return federation_config(tmp_path, **kw).to_run_config()


def test_simulated_node_reads_its_users_folder_and_has_its_own_key(tmp_path):
    node = open_node(_settings(tmp_path), {"partition-id": 1})  # the 2nd user folder in name order
    assert node.user_id == "user001" and len(node.train_rows) == 10 and len(node.eval_rows) == 4
    config = node.config
    assert node.personalizer.key == simulation_key(config, "user001") != simulation_key(config, "user000")
    arrays = node.shared_arrays()
    assert list(arrays.keys()) == ["shared.embedding.weight"]


def test_node_with_no_data_or_bad_rows_is_refused_by_name(tmp_path):
    key = {"key-file": str(tmp_path / "k.key")}
    write_key_file(key["key-file"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        open_node(_settings(tmp_path), {"partition-id": 0, "data-path": str(empty), **key})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only"}\n')
    with pytest.raises(DataError, match="line 1: field 'completion'"):
        open_node(_settings(tmp_path), {"partition-id": 0, "data-path": str(bad), **key})


def test_a_node_without_data_refuses_to_train(tmp_path):
    settings = _settings(tmp_path, data="")
    with pytest.raises(DataError, match="user user000: this node has no data; give it `data-path`"):
        open_node(settings, {"partition-id": 0})
    with pytest.raises(DataError, match="partition-id 7, but the data .* has 3 users"):
        open_node(_settings(tmp_path), {"partition-id": 7})
    with pytest.raises(DataError, match="does not exist"):
        open_node(_settings(tmp_path, data=str(tmp_path / "missing")), {"partition-id": 0})


def test_a_node_takes_its_user_from_a_data_file_with_held_out_rows(tmp_path):
    rows = [{"user": user, "text": f"{user} says {i}"} for i in range(5) for user in ("zoe", "amy", "tom")]
    data = tmp_path / "log.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    node = open_node(_settings(tmp_path, data=str(data), eval_fraction=0.4), {"partition-id": 2})
    assert node.user_id == "zoe"  # ids sorted: amy, tom, zoe
    assert node.train_rows == [f"zoe says {i}" for i in range(3)] and node.eval_rows == ["zoe says 3", "zoe says 4"]
    with pytest.raises(DataError, match="partition-id 3, but the data .* has 3 users"):
        open_node(_settings(tmp_path, data=str(data)), {"partition-id": 3})


def test_shared_prefix_of_another_base_or_shape_is_refused(tmp_path):
    node = open_node(_settings(tmp_path), {"partition-id": 0})
    with pytest.raises(ConfigError, match="for base 000000000000"):
        node.receive_shared(node.shared_arrays(), "0" * 64)
    wrong = ArrayRecord({"shared.embedding.weight": Array(np.zeros((3, 5), np.float32))})
    with pytest.raises(ShapeError, match=r"has shape \(3, 5\), expected \(4, 128\)"):
        node.receive_shared(wrong, node.personalizer.base.fingerprint)
    poisoned = np.full((4, 128), np.nan, np.float32)
    with pytest.raises(ShapeError, match="NaN or Inf"):  # a node refuses a non-finite shared prefix
        node.receive_shared(
            ArrayRecord({"shared.embedding.weight": Array(poisoned)}), node.personalizer.base.fingerprint
        )
    as_int = np.zeros((4, 128), np.int64)
    with pytest.raises(ShapeError, match="dtype int64, expected float32"):
        node.receive_shared(ArrayRecord({"shared.embedding.weight": Array(as_int)}), node.personalizer.base.fingerprint)
    before = node.personalizer.shared.flat().detach().clone()
    node.receive_shared(node.shared_arrays(), node.personalizer.base.fingerprint)  # round trip is exact
    assert (node.personalizer.shared.flat() == before).all()


def test_key_files(tmp_path, caplog):
    raw, hexed, short = tmp_path / "raw", tmp_path / "hex", tmp_path / "short"
    assert write_key_file(raw, bytes(range(32))) == bytes(range(32))
    assert raw.stat().st_mode & 0o777 == 0o600, "a new key file is its owner's alone"
    with pytest.raises(BadKeyError, match="exists already: not replaced"):
        write_key_file(raw)  # a key lost is a store lost
    assert raw.read_bytes() == bytes(range(32))
    hexed.write_text(bytes(range(32)).hex() + "\n")
    short.write_text("abcd")
    with caplog.at_level("WARNING"):
        assert read_key_file(str(raw)) == bytes(range(32))
        assert not caplog.text
        hexed.chmod(0o644)
        assert read_key_file(str(hexed)) == bytes(range(32))
    assert "can be read by other users (mode 644): chmod 600" in caplog.text
    grouped = tmp_path / "grouped"  # hex in groups of two, as `xxd -p` or a person may write it
    grouped.write_text(" ".join(f"{b:02x}" for b in range(32)) + "\n")
    grouped.chmod(0o620)  # others may write, not read: nothing to warn about reading
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert read_key_file(grouped) == bytes(range(32)) and not caplog.text
    with pytest.raises(BadKeyError, match="32 raw bytes or 64 hex digits"):
        read_key_file(str(short))


def test_a_new_key_file_is_on_the_drive_before_it_returns_and_a_failed_write_leaves_none(tmp_path, monkeypatch):
    """The key was written without an fsync while the prefixes stored under it are fsynced: after
    a power loss the store could outlive its key. A write that failed left an empty file, which a
    second try refused as an existing key."""
    from fedprefix.common.store import key_files

    synced = []
    monkeypatch.setattr(key_files, "sync", lambda fd: synced.append(os.fstat(fd).st_size))
    monkeypatch.setattr(key_files, "fsync_dir", lambda folder: synced.append(Path(folder)))
    write_key_file(tmp_path / "a.key")
    assert synced == [32, tmp_path]  # the key's bytes, then its name in the folder

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(key_files, "sync", disk_full)
    with pytest.raises(BadKeyError, match=r"cannot write key file .*b\.key: No space left on device"):
        write_key_file(tmp_path / "b.key")
    assert not (tmp_path / "b.key").exists()


def test_a_device_that_names_its_own_files_must_bring_a_key_file(tmp_path):
    """An auditor's finding: a SuperNode whose key-file was forgotten (or misspelt) encrypted its
    store under a key derived from the run's key-seed, which the coordinator knows."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(f'{{"text": "my note {i}"}}\n' for i in range(6)))
    for device in ({"data-path": str(data)}, {"user-id": "bob"}, {"store": str(tmp_path / "s")}):
        with pytest.raises(ConfigError, match="names this device's own .* but no key-file"):
            open_node(_settings(tmp_path), {"partition-id": 0, **device})
    key = tmp_path / "bob.key"
    write_key_file(key, bytes(range(32)))
    node = open_node(_settings(tmp_path), {"partition-id": 0, "data-path": str(data), "key-file": str(key)})
    assert node.personalizer.key == bytes(range(32)) and node.train_rows[0] == "my note 0"


def test_a_simulated_node_computes_on_its_cpu_share(monkeypatch):
    import types

    import torch
    from fedprefix.client.node import use_cpu_share

    context = types.SimpleNamespace(get_assigned_resources=lambda: {"CPU": 1.0})
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    before = torch.get_num_threads()
    try:
        assert use_cpu_share() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.delitem(sys.modules, "ray")
    assert use_cpu_share() == before, "outside Ray the setting is left alone"


def test_a_second_run_over_the_same_node_store_trains_its_shared_rounds_and_copies_afresh(tmp_path):
    """Node stores outlive a run (the Deployment Engine): after a run whose recipe copied the
    shared prefix into the user's own, every shared round of the next run was refused ("the
    personal part has replaced the shared one") and its copy round fine-tuned the old copy."""
    import torch
    from fedprefix.common.protocol import RoundSettings

    settings = _settings(tmp_path, num_rounds=3, personal_init="shared", shared_only_rounds=2)
    config = federation_config(tmp_path, num_rounds=3, personal_init="shared", shared_only_rounds=2)
    assert [config.round_parts(r) for r in (1, 2, 3)] == ["shared", "shared", "personal"]

    def run(shared_value: float) -> torch.Tensor:
        """One run's three rounds on node 0, each message on a freshly opened node; its stored copy."""
        for server_round in (1, 2, 3):
            node = open_node(settings, {"partition-id": 0})
            fingerprint = node.personalizer.base.fingerprint
            sent = {k: np.full(tuple(v.shape), shared_value, np.float32) for k, v in node.shared_arrays().items()}
            node.receive_shared(ArrayRecord({k: Array(v) for k, v in sent.items()}), fingerprint)
            parts = config.round_parts(server_round)
            node.train_round(RoundSettings(base_fingerprint=fingerprint, train_parts=parts, server_round=server_round))
            if parts == "shared":
                assert node.personalizer.shared.flat().detach().sub(shared_value).abs().max() > 0  # trained
        return open_node(settings, {"partition-id": 0}).personalizer.personal.flat().detach().clone()

    first = run(0.0)
    second = run(1.0)  # a second run, another shared prefix, the same stores
    assert (first - 0.0).abs().max() < 0.5 and (second - 1.0).abs().max() < 0.5  # each a copy of its run's prefix


def test_node_config_mistakes_are_named(tmp_path, caplog):
    """A device owner's mistakes (an auditor's findings): partition-id "abc" gave a bare int()
    ValueError, a missing key file a raw FileNotFoundError, and a misspelled key went unread."""
    with pytest.raises(ConfigError, match="node config partition-id 'abc' must be a whole number"):
        open_node(_settings(tmp_path), {"partition-id": "abc"})
    with pytest.raises(ConfigError, match=r"node config key-file: cannot read key file .*missing.key: No such"):
        open_node(_settings(tmp_path), {"partition-id": 0, "key-file": str(tmp_path / "missing.key")})
    with caplog.at_level("WARNING"):
        open_node(_settings(tmp_path), {"partition-id": 0, "datapath": "x.jsonl"})
    assert "node config keys not read by fedprefix: datapath" in caplog.text


def test_a_wrong_sized_key_is_refused_without_showing_it(tmp_path):
    with pytest.raises(BadKeyError, match="holds 32 raw bytes, got 31 bytes") as refused:
        write_key_file(tmp_path / "k", b"\x07secret-key-material-31-bytes!!")
    assert "secret" not in str(refused.value) and not (tmp_path / "k").exists()
