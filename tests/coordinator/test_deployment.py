"""The same apps under Flower's Deployment Engine: a SuperLink and SuperNodes on loopback."""

from __future__ import annotations

import subprocess
import sys

from fedprefix.common.store.key_files import write_key_file
from fedprefix.coordinator.records import read_run
from fedprefix.coordinator.simulate import write_app
from fedprefix.coordinator.superlink import (
    SUPERLINK_NAME,
    flower_bin,
    flower_env,
    free_port,
    local_superlink,
    stop_process_group,
)

from tests.conftest import federation_config


def test_two_rounds_with_superlink_and_supernodes(tmp_path):
    """The default recipe: round 1 federates the shared prefix, round 2 is the secure round
    (SecAgg+ keeps its state in each SuperNode's context between the messages of the round,
    while every message runs in a fresh ClientApp process)."""
    # Real devices bring their own files (node config `data-path`); the run names no data folder.
    config = federation_config(tmp_path, num_users=2, num_rounds=2, audit_dir="", data="", personal_init="auto")
    own_files = tmp_path / "data"  # written by federation_config: user000/, user001/
    app = write_app(tmp_path / "app", config)
    flwr_home, log = tmp_path / "flwr-home", tmp_path / "flower.log"
    nodes = []
    with local_superlink(flwr_home, log, simulation=False) as port:
        try:
            for user in range(2):
                folder = own_files / f"user{user:03d}"
                write_key_file(folder / "device.key")  # a device names its own files: it brings its key
                node_config = (
                    f'partition-id={user} user-id="device{user}" data-path="{folder / "train.jsonl"}" '
                    f'eval-path="{folder / "eval.jsonl"}" key-file="{folder / "device.key"}"'
                )
                command = [
                    flower_bin("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                ]
                with open(log, "ab") as out:
                    nodes.append(
                        subprocess.Popen(
                            command,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env=flower_env(flwr_home),
                        )
                    )
            with open(log, "ab") as out:
                done = subprocess.run(
                    [flower_bin("flwr"), "run", str(app), SUPERLINK_NAME, "--stream"],
                    env=flower_env(flwr_home),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=900,  # each message starts a ClientApp process that imports torch: 143 s seen under load
                    check=False,
                )
        finally:
            for node in nodes:
                stop_process_group(node)
    assert done.returncode == 0, log.read_text()[-3000:]
    info, rounds, _ = read_run(config.run_dir)
    assert info.status == "finished" and [r.round for r in rounds] == [1, 2]
    assert all(r.replies_accepted == 2 and r.eval_loss_personal is not None for r in rounds)
    assert info.config["personal_init"] == "interpolate" and not rounds[1].rejected
    assert rounds[1].shared_update_norm > 0 and rounds[1].eval_loss_personal < rounds[1].eval_loss_base
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["device0", "device1"]
    assert all(node.poll() is not None for node in nodes)


def test_the_client_app_loads_without_torch_until_a_handler_needs_it():
    """Under the Deployment Engine every message starts a process that loads the ClientApp;
    three of a secure round's four SecAgg+ stages only exchange keys and shares, so loading it
    (and running its mods) must not import torch or transformers (seconds per process)."""
    check = (
        "import sys; from fedprefix.client.app import app; "
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); print(heavy)"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_the_server_app_refuses_rows_past_the_bases_context_before_it_starts_a_run(tmp_path):
    """Under the Deployment Engine nothing runs `fedprefix simulate`'s checks: every node refused
    each round's rows instead, and the run ended with nodes that failed."""
    import pytest
    from fedprefix.common.config import FederationConfig
    from fedprefix.common.errors import ConfigError
    from fedprefix.coordinator.app import run_federation

    config = FederationConfig(base="tiny-llama", max_length=1000, run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="take 1016 positions, past base tiny-llama's context of 512"):
        run_federation(grid=None, config=config)
    assert not (tmp_path / "run").exists()


def test_the_server_app_records_a_stopped_run_as_interrupted_and_one_that_taught_nothing_as_failed(
    tmp_path, monkeypatch
):
    """Under the Deployment Engine (an auditor's findings): `flwr stop` left a run 'failed' with
    'SystemExit: 0', and a run whose every reply was rejected read 'finished'."""
    from types import SimpleNamespace

    import pytest
    from fedprefix.common.config import FederationConfig
    from fedprefix.coordinator import app as server_app
    from fedprefix.coordinator.records import Rejection, read_run

    from tests.coordinator.test_simulate_cleanup import _record

    config = FederationConfig(base="tiny-llama", num_users=2, run_dir=str(tmp_path / "run"))

    def stopped(self, **settings):
        raise SystemExit(0)

    monkeypatch.setattr(server_app.PrefixStrategy, "start", stopped)
    with pytest.raises(SystemExit):
        server_app.run_federation(grid=None, config=config)
    assert read_run(tmp_path / "run")[0].status == "interrupted"

    def taught_nothing(self, **settings):
        rejected = [Rejection(node=7, reason="no rows")]
        self.recorder.append_round(_record(1).model_copy(update={"replies_accepted": 0, "rejected": rejected}))
        return SimpleNamespace(arrays=None)

    monkeypatch.setattr(server_app.PrefixStrategy, "start", taught_nothing)
    with pytest.raises(RuntimeError, match="no node's reply was accepted in any round .*node 7: no rows"):
        server_app.run_federation(grid=None, config=config)
    info = read_run(tmp_path / "run")[0]
    assert info.status == "failed" and "node 7: no rows" in info.error


def test_the_server_app_records_a_run_whose_shared_prefix_cannot_be_written_as_failed(tmp_path, monkeypatch):
    """The final shared prefix was written outside the record's try: a full disk there left the
    run 'running' for ever (an auditor's finding)."""
    from types import SimpleNamespace

    import pytest
    from fedprefix.common.config import FederationConfig
    from fedprefix.coordinator import app as server_app
    from fedprefix.coordinator.records import read_run

    from tests.coordinator.test_simulate_cleanup import _record

    config = FederationConfig(base="tiny-llama", num_users=2, run_dir=str(tmp_path / "run"))
    assert config.sends_shared

    def taught(self, **settings):
        self.recorder.append_round(_record(1))
        return SimpleNamespace(arrays={})

    def full_disk(arrays, run_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server_app.PrefixStrategy, "start", taught)
    monkeypatch.setattr(server_app, "save_shared_prefix", full_disk)
    with pytest.raises(OSError, match="No space"):
        server_app.run_federation(grid=None, config=config)
    info = read_run(tmp_path / "run")[0]
    assert info.status == "failed" and "No space left on device" in info.error
