"""The CLI's promise: every error is one line on stderr and exit code 1; --debug shows the traceback."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from fedprefix.common import base_model, base_registry
from fedprefix.coordinator import cli
from fedprefix.coordinator.cli import main as cli_main


def _run(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["fedprefix", *argv])
    monkeypatch.setitem(cli_main._state, "debug", False)
    cli.run()


def _refuse(name):  # what transformers raised on a fresh clone without accelerate
    raise ValueError("accelerate is required when loading a GGUF file `pip install accelerate`.\nsecond line")


def test_an_error_from_a_dependency_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(base_registry, "fetch", _refuse)
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "base", "fetch", "smollm2-135m-instruct")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "error: ValueError: accelerate is required" in err and "second line" in err and "Traceback" not in err


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(base_registry, "fetch", _refuse)
    with pytest.raises(ValueError, match="accelerate is required"):
        _run(monkeypatch, "--debug", "base", "fetch", "smollm2-135m-instruct")


def test_a_project_error_is_one_line_without_its_type(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "base", "info", "no-such-model")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown base model 'no-such-model'") and err.count("\n") == 1, err


def test_an_unknown_dtype_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "simulate", "--dtype", "float16", "--out", str(tmp_path / "unused"))
    assert exit_.value.code == 2  # a value the option cannot take: a usage error
    assert "--dtype" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists(), "no data may be written for a refused run"


def test_store_commands_share_the_error_printer_and_debug(monkeypatch, capsys, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "store", "list", "--store", missing)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err == f"error: prefix store: no store folder at {missing}\n", err
    with pytest.raises(Exception, match="no store folder"):
        _run(monkeypatch, "--debug", "store", "list", "--store", missing)


def test_store_list_prints_file_names_as_written_not_as_markup_or_escape_codes(monkeypatch, capsys, tmp_path):
    store = tmp_path / "odd[" / "b]"  # the folder's own name in the title: `closing tag '[/b]'` failed the command
    store.mkdir(parents=True)
    (store / "[bold red]boom.fpx").write_bytes(b"not a prefix")
    (store / "\x1b[2Jclear.fpx").write_bytes(b"not a prefix")
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "store", "list", "--store", str(store))
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "[bold red]boom" in out and "\\x1b[2Jclear" in out and "\x1b" not in out, out
    assert "odd[/b]" in "".join(out.split()), out


def test_simulate_checks_the_data_folder_before_starting(monkeypatch, capsys, tmp_path):
    (tmp_path / "data" / "alice").mkdir(parents=True)
    (tmp_path / "data" / "alice" / "train.jsonl").write_text('{"prompt": "p", "completion": "c"}\n' * 2)
    with pytest.raises(SystemExit):
        _run(monkeypatch, "simulate", "--data", str(tmp_path / "data"), "--users", "3", "--out", str(tmp_path / "r"))
    assert "--users 3, but the data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(monkeypatch, "simulate", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert "does not exist" in capsys.readouterr().err


def test_simulate_refuses_bad_own_data_before_starting(monkeypatch, capsys, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"who": "u{i % 3}", "text": "t{i}"}}\n' for i in range(9)))
    lonely = tmp_path / "lonely.jsonl"  # ann has one row: nothing can be held out of it
    lonely.write_text('{"user": "ann", "text": "a"}\n{"user": "ben", "text": "b"}\n{"user": "ben", "text": "c"}\n')
    (tmp_path / "rows.txt").write_text("x")
    out = tmp_path / "run"
    attempts = {
        ("--data", str(rows)): "line 1: no user column 'user' (columns found: text, who)",
        ("--data", str(rows), "--user-field", "who", "--min-rows", "4"): "all 3 users were dropped",
        ("--data", str(rows), "--user-field", "who", "--users-per-round", "4"): "users_per_round 4 is more than",
        ("--data", str(rows), "--user-field", "who", "--users", "4"): "--users 4, but the data",
        ("--data", str(tmp_path / "rows.txt")): "unknown file type '.txt'",
        ("--data", str(tmp_path / "nowhere.jsonl")): "nowhere.jsonl does not exist",
        ("--data", str(rows), "--eval-fraction", "1"): "setting eval_fraction",
        # each node failed alone, and the run ended "finished" with nothing learned for ann
        ("--data", str(lonely), "--min-rows", "1"): "user ann has 1 row: holding rows out needs at least 2",
    }
    for argv, message in attempts.items():
        with pytest.raises(SystemExit):
            _run(monkeypatch, "simulate", *argv, "--out", str(out))
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and err.count("\n") == 1, (argv, err)
    assert not out.exists(), "nothing may be written for a refused run"


def test_error_text_is_printed_as_written_not_as_rich_markup(monkeypatch, capsys, tmp_path):
    """Brackets survive: a path such as rows[1].jsonl, a hint such as 'fedprefix[parquet]'."""
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as on an install without the parquet extra
    (tmp_path / "rows.parquet").write_bytes(b"x")
    cases = {
        str(tmp_path / "rows[1].jsonl"): "rows[1].jsonl does not exist",
        str(tmp_path / "rows.parquet"): "needs pyarrow: pip install 'fedprefix[parquet]'",
    }
    for data, message in cases.items():
        with pytest.raises(SystemExit):
            _run(monkeypatch, "simulate", "--data", data, "--out", str(tmp_path / "r"))
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), err


def test_a_bad_option_or_value_is_one_line_with_usage_exit_code(monkeypatch, capsys):
    cases = {
        ("simulate", "--users", "abc"): "Invalid value for '--users' / '-n': 'abc' is not a valid integer",
        ("simulate", "--bogus"): "No such option '--bogus'",
        ("serve", "--store", ".", "--port", "99999"): "99999 is not in the range 1<=x<=65535",
        # values that started a server which then failed or hung on every request
        ("serve", "--store", ".", "--max-batch-size", "0"): "0 is not in the range 1<=x<=4096",
        ("serve", "--store", ".", "--max-queue", "-1"): "-1 is not in the range x>=1",
        ("serve", "--store", ".", "--max-wait", "-5"): "-5.0 is not in the range x>=0.001",
        ("simulate", "--examples", "-5"): "-5 is not in the range x>=0",
        ("simulate", "--rounds", "0"): "0 is not in the range x>=1",
        ("dashboard", "--port", "99999"): "99999 is not in the range 1<=x<=65535",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            _run(monkeypatch, *argv)
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err and f"(see fedprefix {argv[0]} --help)" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:  # no command: the help, as before
        _run(monkeypatch)
    assert exit_.value.code == 2 and "Usage" in capsys.readouterr().out


def test_serve_refuses_a_missing_store_folder_before_loading(monkeypatch, capsys, tmp_path):
    typo = tmp_path / "stroe"
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "serve", "--base", "no-such-model", "--store", str(typo))
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"error: prefix store: no store folder at {typo}\n"
    assert not typo.exists(), "a typo must not create an empty store"


def test_simulate_refuses_an_unknown_base_before_starting_flower(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "simulate", "--base", "nonexist", "--out", str(tmp_path / "r"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown base model 'nonexist'") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists(), "nothing may be written for a refused run"


def test_simulate_refuses_rows_past_the_bases_context_before_starting_flower(monkeypatch, capsys, tmp_path):
    """Each node's fit refused them, after Flower and Ray had started; the run ended with a
    record of nodes that failed, and the reason only in its log."""
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "simulate", "--base", "tiny-llama", "--set", "max-length=1000", "--out", str(tmp_path / "r"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "the prefix and max-length take 1016 positions, past base tiny-llama's context of 512" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_a_taken_port_is_one_line_before_the_dashboard_starts(monkeypatch, capsys, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            _run(monkeypatch, "dashboard", "--runs", str(tmp_path), "--port", str(port))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not listen on 127.0.0.1:{port}") and err.count("\n") == 1, err


def test_serve_refuses_a_device_or_dtype_it_cannot_use_before_loading(monkeypatch, capsys, tmp_path):
    """Values an option cannot take are usage errors (exit 2, naming --help); a device that
    exists but does not fit the other options, an error (exit 1)."""
    import torch
    from fedprefix.coordinator.superlink import free_port

    cases = {
        ("--device", "banana"): (2, "unknown device 'banana'"),
        ("--device", "meta"): (2, "device 'meta' is not supported"),
        ("--device", "cuda:99"): (2, "device 'cuda:99': torch sees"),
        ("--dtype", "float16"): (2, "'float16' is not one of auto, float32, bfloat16"),
        ("--kv-cache-mib", "0"): (2, "0 is not in the range x>=1"),
    }
    if torch.cuda.is_available():
        cases[("--device", "cuda", "--replicas", "2")] = (1, "--device cuda: replicas (--replicas, --ray-address)")
    for extra, (code, message) in cases.items():
        with pytest.raises(SystemExit) as exit_:
            _run(
                monkeypatch,
                "serve",
                "--base",
                "no-such-model",
                "--store",
                str(tmp_path),
                "--port",
                str(free_port()),
                *extra,
            )
        assert exit_.value.code == code, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert code == 1 or "(see fedprefix serve --help)" in err


def test_simulate_set_overrides_the_option_of_the_same_setting(monkeypatch, capsys, tmp_path):
    """--set base=... (any setting with its own option) was a TypeError: now it wins and is checked."""
    cases = (("base=nope", 1, "unknown base model 'nope'"), ("num-users=x", 2, "--set num_users"))
    for setting, code, message in cases:
        with pytest.raises(SystemExit) as exit_:
            _run(monkeypatch, "simulate", "--set", setting, "--out", str(tmp_path / "unused"))
        assert exit_.value.code == code
        err = capsys.readouterr().err
        assert message in err and "TypeError" not in err and err.count("\n") == 1, err


def test_the_commands_load_without_torch_so_help_answers_at_once():
    """Every command imported torch and transformers (2-3 s, and a traceback on Ctrl-C meanwhile)."""
    probe = (
        "import sys; from fedprefix.coordinator.cli import app; from typer.testing import CliRunner; "
        "out = CliRunner().invoke(app, ['--help']).output; "
        "print(all(c in out for c in ('simulate', 'serve', 'store', 'base', 'dashboard', 'runs', 'show'))); "
        "print(sorted(m for m in ('torch', 'transformers', 'flwr', 'ray') if m in sys.modules))"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert shown.stdout.split("\n")[:2] == ["True", "[]"], shown.stdout + shown.stderr


def test_version_names_fedprefix_and_what_its_runs_depend_on():
    """--version answers from the installed metadata, without loading torch (a bug report's first line)."""
    from importlib.metadata import version

    probe = (
        "import sys; from fedprefix.coordinator.cli import app; from typer.testing import CliRunner; "
        "result = CliRunner().invoke(app, ['--version']); print(result.exit_code, result.output.strip()); "
        "print(sorted(m for m in ('torch', 'transformers', 'flwr', 'ray') if m in sys.modules))"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line, loaded = shown.stdout.strip().split("\n")
    expected = " ".join(f"{name} {version(name)}" for name in ("fedprefix", "torch", "transformers", "flwr", "ray"))
    assert line == f"0 {expected}" and loaded == "[]", shown.stdout + shown.stderr


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_commands", interrupted)
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "runs")
    assert exit_.value.code == 130 and capsys.readouterr().err == "aborted\n"


@pytest.mark.parametrize(
    ("typed", "code", "err"),
    [
        (EOFError, 1, "error: no key for 'alice': the input ended at the passphrase prompt"),
        (KeyboardInterrupt, 130, "aborted"),
    ],
)
def test_ctrl_d_at_the_passphrase_prompt_is_an_error_and_ctrl_c_aborts(monkeypatch, capsys, tmp_path, typed, code, err):
    """Ctrl-D ends the input (exit 1, as any refused command); only Ctrl-C is an interruption (130)."""
    import click.termui

    def at_the_prompt(prompt):
        raise typed

    (tmp_path / "store").mkdir()
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(click.termui, "hidden_prompt_func", at_the_prompt)
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "store", "verify", "alice", "--store", str(tmp_path / "store"))
    assert exit_.value.code == code
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(err)


class _Unreadable:
    def isatty(self):
        return False

    def readline(self):
        raise OSError(9, "Bad file descriptor")


@pytest.mark.parametrize("stdin", [None, _Unreadable()], ids=["closed", "nohup"])
def test_a_closed_or_unreadable_stdin_is_no_key_not_a_crash(monkeypatch, capsys, tmp_path, stdin):
    """`<&-` had raised AttributeError, nohup's unreadable stdin "[Errno 9] Bad file descriptor"."""
    (tmp_path / "store").mkdir()
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "store", "verify", "alice", "--store", str(tmp_path / "store"))
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: no key for 'alice': give --key-file or --passphrase-env, or pipe the passphrase in"
    )


def test_a_closed_stdout_is_no_terminal(monkeypatch):
    """`fedprefix base list >&-`: every command had failed at import (None.isatty())."""
    from fedprefix.coordinator.views import make_console

    monkeypatch.setattr(sys, "stdout", None)
    assert make_console().width == 120


def test_a_cache_folder_with_a_tilde_or_relative_is_the_users_home_or_taken_once(monkeypatch, tmp_path):
    """A quoted "~/fpc" (systemd, Docker, a .env file) had made a folder named "~" here."""
    from fedprefix.common.base_registry import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDPREFIX_CACHE", "~/fpc")
    assert cache_dir() == tmp_path / "home" / "fpc"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDPREFIX_CACHE", "cache")
    assert cache_dir() == tmp_path / "cache"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--users", "100000"], "--users 100000 x --examples up to 200: the simulated personas hold at most"),
        (["--users", "200", "--examples", "10000"], "personas hold at most 1,000,000 rows"),
        (["--rounds", "1000000"], "setting num_rounds: Input should be less than or equal to 100000"),
        (["--users", "2000000", "--data", "chats.jsonl"], "setting num_users: Input should be less than or equal"),
        (["--eval-fraction", "1"], "setting eval_fraction"),
        (["--set", "rounds"], "--set expects KEY=VALUE, got 'rounds'"),
        (["--set", "no-such-setting=1"], "--set no-such-setting: no such setting (see"),
        (["--set", "max-lenght=96"], "--set max-lenght: no such setting (did you mean max-length?)"),
        # the personas' 4 users were settled only after the first check: their data was written first
        (["--users-per-round", "10", "--examples", "5"], "users_per_round 10 is more than num_users 4"),
        (["--users", "3", "-k", "10"], "users_per_round 10 is more than num_users 3"),
        (["--set", "run_dir="], "--set run_dir: an empty path"),  # the current folder, past --out's check
        (["--set", "data= "], "--set data: an empty path"),
        # every node refuses a learning rate above 1: the secure round then hid why all had failed
        (["--set", "learning-rate=2"], "setting learning_rate: Input should be less than or equal to 1"),
        (["--set", "copy-learning-rate=5"], "setting copy_learning_rate: Input should be less than or equal to 1"),
    ],
)
def test_simulate_settings_out_of_bounds_are_usage_errors_before_anything_is_written(
    monkeypatch, capsys, tmp_path, argv, message
):
    """--users 1e9 wrote persona folders until the disk was full; a setting's own rule exited 1."""
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "simulate", *argv, "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in " ".join(err.split()), err
    assert "(see fedprefix simulate --help)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists(), "nothing may be written for a refused run"


def test_a_run_folder_that_cannot_be_used_is_refused_before_the_data_is_written(monkeypatch, capsys, tmp_path):
    foreign = tmp_path / "run"
    (foreign / "stores").mkdir(parents=True)  # node stores no simulation made: a run would empty them
    (foreign / "stores" / "alice.fpx").write_bytes(b"someone's prefix")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = {
        str(foreign): "exists and no simulation made it",
        str(a_file): f"run folder {a_file}: {a_file} is a file, not a folder",  # was a raw NotADirectoryError
        str(a_file / "run"): f"{a_file} is a file, not a folder",
        # `show` and the dashboard refused the run's name afterwards
        str(tmp_path / "ö1"): "its name 'ö1' is no run id (letters, digits, '.', '_', '-'; up to 128)",
    }
    for out, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            _run(monkeypatch, "simulate", "--out", out)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in foreign.iterdir()) == ["stores"], "no persona data may be written into it"
    assert not (tmp_path / "ö1").exists()
    assert (foreign / "stores" / "alice.fpx").read_bytes() == b"someone's prefix"


def test_a_runs_path_that_is_a_file_or_a_foreign_host_is_named_as_such(monkeypatch, capsys, tmp_path):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("x")
    cases = {
        ("runs", "--runs", str(a_file)): f"runs folder {a_file} is not a folder",
        ("dashboard", "--runs", str(a_file)): f"runs folder {a_file} is not a folder",
        # TEST-NET-3 (RFC 5737): an address no machine of ours has; it said "is the port in use?"
        ("dashboard", "--runs", str(tmp_path), "--host", "203.0.113.7"): "(not an address of this machine)",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            _run(monkeypatch, *argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and message in err and err.count("\n") == 1, err
        assert "port in use" not in err


def test_the_cli_names_the_stores_key_size():
    from fedprefix.common import store
    from fedprefix.coordinator.cli import store as store_commands

    assert store_commands.KEY_BYTES == store.KEY_BYTES  # its own copy: the store imports torch


def test_base_list_json_says_which_bases_are_built_in_process(monkeypatch, capsys, tmp_path):
    import json

    monkeypatch.setenv("FEDPREFIX_CACHE", str(tmp_path))  # nothing fetched
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "base", "list", "--json")
    assert exit_.value.code in (0, None)
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tiny-llama"]["in_process"] and rows["tiny-llama"]["ready"]
    smollm2 = rows[base_model.DEFAULT_BASE]  # the built-in base: from a PyPI package, converted once
    assert not smollm2["in_process"] and not smollm2["ready"]


def test_printable_shows_hidden_characters_and_keeps_text():
    from fedprefix.coordinator.views import printable

    assert printable("naïve 鍵 tab\there\nline") == "naïve 鍵 tab\there\nline"
    # as Python writes them: \x202e read as \x20 (a space) and "2e"
    assert printable("\x1b[2J \u2028 \u202e \u200b \x9b") == "\\x1b[2J \\u2028 \\u202e \\u200b \\x9b"


def test_sigterm_stops_a_command_as_ctrl_c_does_so_its_cleanup_runs(tmp_path):
    """SIGTERM killed store and base commands outright: a fetch's half-converted temp folder
    (0.5 GiB) stayed behind. Now it is `aborted`, exit 130, with the command's finally run."""
    script = (
        "import sys, time; from pathlib import Path; from fedprefix.coordinator import cli; "
        "from fedprefix.coordinator.cli.main import app\n"
        "@app.command('hold')\n"
        "def hold(path: str) -> None:\n"
        "    Path(path).write_text('working')\n"
        "    try:\n"
        "        time.sleep(60)\n"
        "    finally:\n"
        "        Path(path).unlink()\n"
        "sys.argv = ['fedprefix', 'hold', sys.argv[1]]; cli.run()\n"
    )
    working = tmp_path / "working"
    held = subprocess.Popen([sys.executable, "-c", script, str(working)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not working.exists() and time.monotonic() < deadline and held.poll() is None:
            time.sleep(0.05)
        assert working.exists(), held.stderr.read() if held.poll() is not None else "the command never started"
        held.send_signal(signal.SIGTERM)
        assert held.wait(timeout=20) == 130
        assert held.stderr.read().strip().splitlines()[-1] == "aborted"
        assert not working.exists()
    finally:
        held.kill()
        held.wait()


def test_flower_app_writes_the_app_an_installed_package_runs_and_never_replaces_a_project(
    monkeypatch, capsys, tmp_path
):
    import tomllib

    from fedprefix.common.config import FederationConfig

    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "flower-app", str(tmp_path / "app"))
    assert exit_.value.code in (0, None)
    app = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedprefix.coordinator.app:app", "clientapp": "fedprefix.client.app:app"}
    assert app["config"] == FederationConfig().to_run_config()  # what a checkout's pyproject.toml holds
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, "flower-app", str(mine))
    assert exit_.value.code == 1 and "pyproject.toml exists already" in capsys.readouterr().err
    assert (mine / "pyproject.toml").read_text() == "[project]\nname = 'mine'\n"


def test_tls_and_host_options_are_checked_before_anything_loads(monkeypatch, capsys, tmp_path):
    """A half-given, missing or unusable certificate is one line (exit 1) before a base loads or Ray
    starts; a server bound beyond loopback without TLS is warned about (keys travel in its headers)."""
    store = tmp_path / "store"
    store.mkdir()
    cases = {
        (
            "serve",
            "--store",
            str(store),
            "--ssl-certfile",
            "cert.pem",
        ): "TLS needs both --ssl-certfile and --ssl-keyfile",
        ("dashboard", "--runs", str(tmp_path), "--ssl-keyfile", "k.pem"): "TLS needs both",
        (
            "serve",
            "--store",
            str(store),
            "--ssl-certfile",
            "c.pem",
            "--ssl-keyfile",
            "k.pem",
        ): "TLS: c.pem is not a file",
        ("serve", "--store", str(store), "--ssl-certfile", str(store), "--ssl-keyfile", str(store)): "is not a file",
        ("dashboard", "--runs", str(tmp_path), "--ssl-certfile", __file__, "--ssl-keyfile", __file__): "cannot use",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            _run(monkeypatch, *argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and message in err and err.count("\n") == 1, (argv, err)
    monkeypatch.setattr(cli_main, "fail", lambda exc: pytest.fail(str(exc)))
    assert cli_main.http_exposure("0.0.0.0", None, [], None, None) is None
    assert "listening on 0.0.0.0 without TLS" in capsys.readouterr().err
    assert cli_main.http_exposure("127.0.0.1", None, ["*"], None, None) is None and not capsys.readouterr().err


def test_the_rounds_table_fits_an_80_column_terminal_without_cutting_numbers():
    """`make demo` in a default terminal showed losses as "5.5…" and the norm as "0.…"."""
    import io

    from fedprefix.coordinator.records import RoundRecord
    from fedprefix.coordinator.views import rounds_table
    from rich.console import Console

    record = RoundRecord(
        round=10, sampled_users=list(range(12)), replies_accepted=12, replies_rejected=0, train_loss=5.5012,
        eval_loss_base=5.588, eval_loss_shared=5.1234, eval_loss_personal=4.2345, shared_update_norm=0.123456,
        uplink_bytes=123456, train_seconds_sum=30.0, seconds=101.2,
    )  # fmt: skip
    console = Console(width=80, file=io.StringIO())
    console.print(rounds_table([record]))
    shown = console.file.getvalue()
    assert "…" not in shown and "5.501" in shown and "101.2" in shown and "rnd" in shown


@pytest.mark.parametrize("term", ["dumb", "xterm-256color"])
def test_round_progress_on_a_dumb_terminal_prints_plain_lines_in_order(monkeypatch, term):
    """TERM=dumb: the bar's description line came out after the round lines, cut to 80 columns."""
    import io

    from fedprefix.coordinator.records import RoundRecord
    from fedprefix.coordinator.views import round_progress
    from rich.console import Console

    monkeypatch.setenv("TERM", term)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    record = RoundRecord(
        round=1, sampled_users=[1], replies_accepted=1, replies_rejected=0, train_loss=1.0, eval_loss_base=2.0,
        eval_loss_shared=1.5, eval_loss_personal=1.2, shared_update_norm=0.1, uplink_bytes=1, train_seconds_sum=1.0,
        seconds=1.0,
    )  # fmt: skip
    with round_progress(console, 2, "simulating 2 users x 2 rounds") as show:
        show(record)
    lines = out.getvalue().splitlines()
    if term == "dumb":
        assert lines[0] == "simulating 2 users x 2 rounds" and lines[1].startswith("round 1/2: train loss 1.000")
    else:
        assert "\x1b[" in out.getvalue()  # a live bar where the terminal draws one


@pytest.mark.parametrize("source", ["env", "stdin"])
def test_a_utf8_passphrase_reads_the_same_under_a_non_utf8_locale(tmp_path, source):
    """LC_ALL=C with PYTHONUTF8=0: a UTF-8 passphrase from --passphrase-env or stdin was refused
    as "not valid Unicode text" (an auditor's finding); under Latin-1 it became another one."""
    import subprocess

    from fedprefix.common.store import PrefixStore

    from tests.common.test_store_hardening import make_prefix
    from tests.conftest import FEDPREFIX_CLI

    passphrase = "pässwörd ünïcode"
    PrefixStore(tmp_path / "store", scrypt_n=2**10).save("alice", make_prefix(1), passphrase)
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "", "PW": passphrase}
    command = [FEDPREFIX_CLI, "store", "verify", "alice", "--store", str(tmp_path / "store")]
    if source == "env":
        command += ["--passphrase-env", "PW"]
    done = subprocess.run(command, env=env, input=passphrase.encode() + b"\n", capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def test_hugging_faces_progress_bars_are_off_off_a_terminal_unless_the_user_chose(monkeypatch):
    """`make demo > log`: the fetch and every load wrote \\r-joined bars into the log."""
    from fedprefix.coordinator.views import progress_bars_on_terminals_only
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal
    try:
        progress_bars_on_terminals_only()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert not transformers_logging.is_progress_bar_enabled()  # imported before: switched off too
        transformers_logging.enable_progress_bar()
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
        progress_bars_on_terminals_only()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"  # the user's choice stands
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        (transformers_logging.enable_progress_bar if was_on else transformers_logging.disable_progress_bar)()
