"""Shakespeare users: speeches parsed as LEAF does, held-out rule, role choice, and the report on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fedprefix.common.base_model import load_base
from fedprefix.common.errors import DataError
from fedprefix.common.prefix import Prefix, PrefixConfig
from fedprefix.common.protocol import pack_shared
from fedprefix.simulations import shakespeare, shakespeare_report
from fedprefix.simulations.shakespeare import Role, parse_play, pick_roles, play_roles, write_federation_data
from fedprefix.simulations.shakespeare_tables import goals, write_report
from safetensors.torch import save_file

PLAY = """THE TRAGEDY OF TESTING

PERSONS REPRESENTED:

HAMLET, Prince.
Hor.

ACT I.

SCENE I. Elsinore.

[Enter Hamlet and Horatio.]

Ham.
To be, or not to be: that is the question:
Whether 'tis nobler in the mind to suffer [Aside.]

Hor.
My lord?

Ham.
Nothing.

Hor.
Speak, my lord.

Ham.
I'll speak to it though hell itself should gape.
[Exit.]

First Ghost.
Remember me.
"""


def test_speeches_follow_their_speaker_line_and_drop_stage_directions():
    speeches = parse_play(PLAY)
    assert [s.speaker for s in speeches] == ["Ham", "Hor", "Ham", "Hor", "Ham", "First Ghost"]
    assert speeches[0].text == "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer"
    assert speeches[4].text == "I'll speak to it though hell itself should gape."  # "[Exit.]" dropped
    assert "HAMLET" not in {s.speaker for s in speeches}  # the cast list before Act I is not a speech


def test_rows_answer_the_previous_speech_and_leaf_drops_small_roles():
    # Hor has 2 rows, Ham 2 and the ghost 1: LEAF drops roles with 2 speeches or fewer, then
    # plays left with one role or none
    assert play_roles("test", parse_play(PLAY)) == []
    lines = [f"line {i} " + "word " * 8 + "end" for i in range(20)]  # 11 words a line
    speeches = [shakespeare.Speech(name, "\n".join(lines)) for name in "ABC"] * 3  # A answers twice: dropped
    row = {r.speaker: r for r in play_roles("p", speeches)}["B"].rows[0]
    # whole lines: the prompt keeps the previous speech's last ones, the reply its first ones
    assert row["prompt"] == "A: " + "\n".join(lines[-(shakespeare.PROMPT_WORDS // 11) :])
    assert row["completion"] == "\n".join(lines[: shakespeare.REPLY_WORDS // 11])


def test_the_last_fifth_in_play_order_is_held_out(tmp_path):
    role = Role("play", "Nurse", [{"prompt": str(i), "completion": str(i)} for i in range(11)])
    train, held_out = role.split()
    assert [r["prompt"] for r in held_out] == ["8", "9", "10"]  # ceil(0.2 * 11) = 3, the last ones
    assert train + held_out == role.rows
    write_federation_data(tmp_path, [role])
    lines = (tmp_path / "play__nurse" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == ["8", "9", "10"]


def _role(play: str, name: str, rows: int) -> Role:
    return Role(play, name, [{"prompt": f"{name} {i}?", "completion": f"{name} says {i}."} for i in range(rows)])


def test_roles_are_picked_per_size_bucket_across_plays():
    roles = [_role(f"p{i}", f"r{i}", n) for i, n in enumerate([10, 12, 20, 60, 70, 90, 150, 200, 300])]
    chosen = pick_roles(roles, per_bucket=2, seed=1)
    buckets = [shakespeare.bucket(len(r.split()[0])) for r in chosen]
    assert buckets == ["<=30"] * 2 + ["30-100"] * 2 + [">100"] * 2
    assert chosen == pick_roles(roles, per_bucket=2, seed=1)  # seeded
    with pytest.raises(DataError, match="only 3 roles with <=30 training rows, 4 asked"):
        pick_roles(roles, per_bucket=4)


def test_goals_are_checked_per_bucket():
    roles = [{"user": "a", "bucket": "<=30"}, {"user": "b", "bucket": "30-100"}, {"user": "c", "bucket": ">100"}]
    loss = {  # base, personal, shared, shared+personal, LoRA per role
        "a": (4.0, 3.9, 3.5, 3.4, 3.6),
        "b": (4.0, 3.5, 3.8, 3.4, 3.5),
        "c": (4.0, 3.4, 3.9, 3.5, 3.2),
    }
    names = ("base", "personal", "shared", "shared+personal", "LoRA")
    approaches = {n: {u: {"loss": loss[u][i], "accuracy": 0.2} for u in loss} for i, n in enumerate(names)}
    met = {g: ok for g, _, ok in goals({"approaches": approaches, "roles": roles})}
    assert met["personal beats base for >= 95% of roles"]
    assert met["shared+personal beats personal on the mean"]  # 3.433 < 3.6
    assert met["prefix gain >= 90% of LoRA's, <=30 rows"]  # 0.6 vs 0.4
    assert not met["prefix gain >= 90% of LoRA's, >100 rows"]  # 0.5 vs 0.8


def test_report_runs_every_local_approach_on_a_tiny_model(tmp_path, monkeypatch):
    """The report's own code path, on tiny-llama and made-up roles (the real texts need PyPI)."""
    roles = [_role("p1", "a", 12), _role("p2", "b", 50), _role("p3", "c", 140)]
    monkeypatch.setattr(shakespeare_report, "all_roles", lambda: roles)
    settings = shakespeare_report.Settings(
        base="tiny-llama", per_bucket=1, steps=4, batch_size=4, personal_tokens=4, shared_tokens=4, full_ft_roles=1
    )
    results = shakespeare_report.run(settings, tmp_path, ["base", "personal", "LoRA", "full fine-tuning"])
    assert set(results["approaches"]) == {"base", "personal", "LoRA", "full fine-tuning"}
    for name, scores in results["approaches"].items():
        assert set(scores) == {"p1__a", "p2__b", "p3__c"}, name
        assert all(0.0 <= s["accuracy"] <= 1.0 and s["loss"] > 0 for s in scores.values())
    lora, prefix = results["approaches"]["LoRA"]["p1__a"], results["approaches"]["personal"]["p1__a"]
    assert lora["user_parameters"] >= prefix["user_parameters"] > 0  # LoRA gets at least the prefix's size
    markdown = write_report(json.loads((tmp_path / "results.json").read_text()), tmp_path)
    assert "| personal |" in markdown and (tmp_path / "gain_vs_rows.png").stat().st_size > 5_000
    # 'shared then copy' starts from the 'shared' approach's final prefix, in its run folder
    with pytest.raises(SystemExit, match="run that first"):
        shakespeare_report.run(settings, tmp_path, ["shared then copy"])
    base = load_base("tiny-llama")
    shared = Prefix(PrefixConfig(spec=base.prefix_spec(4), base_fingerprint=base.fingerprint))
    (tmp_path / "run-shared").mkdir()
    save_file(pack_shared(shared.state_tensors()), str(tmp_path / "run-shared" / "shared_prefix.safetensors"))
    copies = shakespeare_report.run(settings, tmp_path, ["shared then copy"])["approaches"]["shared then copy"]
    assert (
        set(copies) == {"p1__a", "p2__b", "p3__c"}
        and copies["p1__a"]["user_parameters"] == 4 * shared.config.spec.flat_dim
    )
    # A partial rerun into the same folder keeps the other approaches' results only while they
    # stay true: it may change just the settings that no approach it keeps reads.
    recipe = dataclasses.replace(settings, copy_learning_rate=1e-3)  # read by 'shared then copy', kept
    federated = dataclasses.replace(settings, federation_learning_rate=0.5)  # read by all three federated
    refused = [
        (dataclasses.replace(settings, steps=5), "shared+personal"),
        (federated, "shared+personal"),
        (recipe, "base"),
        (recipe, "shared+personal"),
    ]
    for changed, rerun in refused:
        with pytest.raises(SystemExit, match="other settings"):
            shakespeare_report.run(changed, tmp_path, [rerun])
    scored = shakespeare_report.Score(loss=1.0, accuracy=0.5)
    monkeypatch.setattr(shakespeare_report, "federated", lambda base, roles, *_: {r.user_id: scored for r in roles})
    results = shakespeare_report.run(recipe, tmp_path, ["shared+personal", "shared then copy"])
    assert results["settings"]["copy_learning_rate"] == 1e-3 and len(results["approaches"]) == 6
    federated = dataclasses.replace(recipe, federation_learning_rate=0.5)
    results = shakespeare_report.run(federated, tmp_path, ["shared", "shared+personal", "shared then copy"])
    assert results["settings"]["federation_learning_rate"] == 0.5 and len(results["approaches"]) == 7


def test_report_names_an_unknown_approach_or_setting(capsys):
    from fedprefix.simulations import shakespeare_report

    for argv, named in (
        (["--approaches", "lora"], "unknown approach lora: choose from base, personal"),
        (["--set", "stepz=3"], "--set stepz=3: no such setting"),
    ):
        with pytest.raises(SystemExit):
            shakespeare_report.main(argv)
        assert named in capsys.readouterr().err
