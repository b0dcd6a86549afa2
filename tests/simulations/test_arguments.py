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
