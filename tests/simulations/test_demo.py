"""`make demo`'s federation: the folder it leaves is one that `fedprefix simulate --out` may reuse."""

from __future__ import annotations

import pytest
from fedprefix.common.config import FederationConfig
from fedprefix.coordinator import run_folder
from fedprefix.coordinator import simulate as simulate_module
from fedprefix.simulations import demo


def test_the_demo_run_folder_is_one_simulate_may_run_into_again(tmp_path, monkeypatch):
    def stop_here(*args, **kwargs):
        raise RuntimeError("stop before Flower starts")

    monkeypatch.setattr(simulate_module, "write_app", stop_here)
    out = tmp_path / "runs" / "demo"
    with pytest.raises(RuntimeError, match="stop before Flower"):
        demo.main(["--base", "tiny-llama", "--users", "2", "--rounds", "1", "--examples", "6", "--out", str(out)])
    assert (out / "stores" / run_folder.SIMULATION_MARK).is_file()
    # what the README shows next: `fedprefix simulate --users 4 --rounds 3 --out runs/demo`
    run_folder.check_run_folder(FederationConfig(base="tiny-llama", num_users=4, num_rounds=3, run_dir=str(out)))


@pytest.mark.parametrize(
    "layout", [("data/mine.jsonl", "pyproject.toml"), ("run/notes.txt", "data/thesis.txt"), ("data/x",)]
)
def test_the_demo_never_empties_a_folder_no_run_made(tmp_path, layout):
    """A checkout, a folder with a run/ of its own (once taken for an old demo's), one with data/ alone."""
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    with pytest.raises(SystemExit, match="no fedprefix run made"):
        demo.main(["--base", "tiny-llama", "--out", str(tmp_path)])
    assert all((tmp_path / name).is_file() for name in layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name.split("/")[0] for name in layout})  # no mark


@pytest.mark.parametrize("flag", ["--users", "--rounds", "--local-steps", "--examples"])
def test_the_demo_refuses_counts_below_one_before_touching_anything(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--base", "tiny-llama", flag, "0", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and "'0' is not a whole number of at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_one_user_demo_unlocks_that_user(tmp_path, monkeypatch):
    """The demo unlocked user001 whatever --users said: with one user it failed after the federation."""
    unlocked = []
    monkeypatch.setattr(demo, "simulate", lambda config, on_round: [])
    monkeypatch.setattr(demo.Personalizer, "load", lambda **kw: unlocked.append(kw["user_id"]) or "me")
    monkeypatch.setattr(demo, "compare", lambda me, data, title: None)
    argv = ["--base", "tiny-llama", "--users", "1", "--rounds", "1", "--examples", "6"]
    demo.main([*argv, "--out", str(tmp_path / "d")])
    assert unlocked == ["user000"]


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
