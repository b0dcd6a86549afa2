"""The personalization benchmark's quick mode (tiny model): every approach runs and the report is written."""

from __future__ import annotations

import json

from fedprefix.simulations.report import main


def test_quick_report(tmp_path):
    main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["approaches"]) == {"base", "shared", "personal", "shared+personal", "full fine-tuning", "LoRA"}
    for name in ("shared", "personal", "shared+personal"):
        for user, scores in results["approaches"][name].items():
            assert scores["loss"] < results["approaches"]["base"][user]["loss"], (name, user)
    personal, both = results["approaches"]["personal"], results["approaches"]["shared+personal"]
    for user in both:  # the MLP is trained but only the folded prefix is kept; the shared part is common
        assert both[user]["user_parameters"] == personal[user]["user_parameters"] > 0
        assert personal[user]["trainable_parameters"] > personal[user]["user_parameters"]
        assert both[user]["trainable_parameters"] > personal[user]["trainable_parameters"]
    assert set(results["ablation"]) == {"P=2, MLP", "P=4, MLP", "P=4, direct"}
    report = (tmp_path / "report.md").read_text()
    assert "| shared+personal |" in report and "low-data comparison" in report
    for plot in ("loss_per_round.png", "per_user_gain.png"):
        assert (tmp_path / plot).stat().st_size > 5_000
