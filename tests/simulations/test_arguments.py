"""The benchmarks refuse a count below 1 by name, before any work (`--repeats 0` ended in a traceback)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    ("module", "flag"),
    [
        ("bench_store", "--repeats"),
        ("bench_store", "--kdf-repeats"),
        ("bench_train", "--steps"),
        ("bench_federation", "--users"),
        ("bench_serving", "--peft-lengths"),
        ("demo", "--examples"),
    ],
)
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_counts_below_one_are_usage_errors(module, flag, value, capsys):
    main = importlib.import_module(f"fedprefix.simulations.{module}").main
    with pytest.raises(SystemExit) as stopped:
        main([flag, value])
    assert stopped.value.code == 2
    assert f"{flag}: {value!r} is not a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["report", "shakespeare_report", "bench_train", "bench_serving", "bench_all"])
def test_a_missing_optional_module_is_one_line_before_any_work(module, monkeypatch):
    """An auditor's finding: without peft, `report --quick` trained for minutes, then raised
    ModuleNotFoundError and wrote nothing."""
    import importlib.util

    main = importlib.import_module(f"fedprefix.simulations.{module}").main
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else found(name, *a))
    with pytest.raises(SystemExit, match=r"this needs peft.*pip install 'fedprefix\[report\]'"):
        main(["--out", "/nonexistent/never-written"] if "report" in module else [])
