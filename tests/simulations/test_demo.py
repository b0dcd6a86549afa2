"""`make demo`'s federation: the folder it leaves is one that `fedprefix simulate --out` may reuse."""

from __future__ import annotations

import pytest
from fedprefix.common.config import FederationConfig
from fedprefix.coordinator import simulate as simulate_module
from fedprefix.simulations import demo


def test_the_demo_run_folder_is_one_simulate_may_run_into_again(tmp_path, monkeypatch):
    def stop_here(*args, **kwargs):
        raise RuntimeError("stop before Flower starts")

    monkeypatch.setattr(simulate_module, "write_app", stop_here)
    out = tmp_path / "runs" / "demo"
    with pytest.raises(RuntimeError, match="stop before Flower"):
        demo.main(["--base", "tiny-llama", "--users", "2", "--rounds", "1", "--examples", "6", "--out", str(out)])
    assert (out / "stores" / simulate_module.SIMULATION_MARK).is_file()
    # what the README shows next: `fedprefix simulate --users 4 --rounds 3 --out runs/demo`
    simulate_module.check_run_folder(FederationConfig(base="tiny-llama", num_users=4, num_rounds=3, run_dir=str(out)))


def test_the_demo_never_empties_a_folder_no_run_made(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text("{}\n")
    (tmp_path / "pyproject.toml").write_text("")  # say, a checkout
    with pytest.raises(SystemExit, match="no run made"):
        demo.main(["--base", "tiny-llama", "--out", str(tmp_path)])
    assert (tmp_path / "data" / "mine.jsonl").is_file()


def test_the_demo_reruns_into_its_folder_after_a_ctrl_c_before_any_record(tmp_path, monkeypatch):
    """Stopped in round 1: data/, stores/, flower.log and the run's mark, but no run.json."""
    out = tmp_path / "demo"

    def stop_here(*args, **kwargs):
        raise RuntimeError("stop before Flower starts")

    monkeypatch.setattr(simulate_module, "write_app", stop_here)
    argv = ["--base", "tiny-llama", "--users", "2", "--rounds", "1", "--examples", "6", "--out", str(out)]
    with pytest.raises(RuntimeError, match="stop before Flower"):
        demo.main(argv)
    (out / "flower.log").write_text("interrupted\n")
    assert not (out / "run.json").exists()
    with pytest.raises(RuntimeError, match="stop before Flower"):  # not refused as a folder no run made
        demo.main(argv)
