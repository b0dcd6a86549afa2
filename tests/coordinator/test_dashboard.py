"""CLI `runs` / `show` and the dashboard, on a run folder written by a real tiny simulation."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from fedprefix.common.http_guards import allowed_hosts
from fedprefix.coordinator import runs as runs_module
from fedprefix.coordinator.cli import app
from fedprefix.coordinator.dashboard.app import create_dashboard
from fedprefix.coordinator.records import read_run
from fedprefix.coordinator.simulate import simulate
from fedprefix.coordinator.superlink import free_port
from fedprefix.coordinator.views import ASCII_SPARKS
from typer.testing import CliRunner

from tests.conftest import FEDPREFIX_CLI, federation_config, interruptible

ROUNDS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/ with one finished 3-round run ('tiny') and a copy with a corrupt line ('broken')."""
    root = tmp_path_factory.mktemp("runs")
    config = federation_config(root, num_users=2, num_rounds=ROUNDS, run_dir=str(root / "runs" / "tiny"), audit_dir="")
    simulate(config)
    broken = root / "runs" / "broken"
    shutil.copytree(root / "runs" / "tiny", broken)
    lines = (broken / "rounds.jsonl").read_text().splitlines()
    lines.insert(1, '{"round": 2, "oops"')
    (broken / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    return root / "runs"


runner = CliRunner()


def test_cli_runs_and_show(runs):
    listed = runner.invoke(app, ["runs", "--runs", str(runs), "--json"])
    assert listed.exit_code == 0, listed.output
    ids = {r["id"]: r for r in json.loads(listed.output)}
    assert ids["tiny"]["rounds_done"] == ROUNDS and ids["tiny"]["status"] == "finished"
    shown = runner.invoke(app, ["show", "tiny", "--runs", str(runs)])
    assert shown.exit_code == 0, shown.output
    assert "personalization gain" in shown.output and "eval_loss_personal" in shown.output
    assert "mode shared+personal (text)" in " ".join(shown.output.split())  # the recipe that ran
    as_json = json.loads(runner.invoke(app, ["show", "tiny", "--runs", str(runs), "--json"]).output)
    assert [r["round"] for r in as_json["rounds"]] == [1, 2, 3]


def test_show_draws_its_sparklines_in_what_the_output_can_encode(runs):
    """Under an ASCII encoding the tables turned to ASCII and the sparklines printed \\u2581\\u2588."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    shown = subprocess.run(
        [FEDPREFIX_CLI, "show", "tiny", "--runs", str(runs)], env=env, capture_output=True, timeout=120
    )
    out = shown.stdout.decode("ascii")
    assert shown.returncode == 0 and "\\u25" not in out, out
    line = next(line for line in out.splitlines() if line.startswith("train_loss"))
    assert set(line.split()[1]) <= set(ASCII_SPARKS) and len(line.split()[1]) == ROUNDS, line


def test_cli_prints_run_names_as_written(runs, tmp_path):
    shutil.copytree(runs / "tiny", tmp_path / "a[b]")  # a folder name, not rich markup
    listed = runner.invoke(app, ["runs", "--runs", str(tmp_path)])
    assert listed.exit_code == 0 and "a[b]" in listed.output, listed.output
    assert "'a[b]' is not a valid run id" in " ".join(listed.output.split())  # `show a[b]` refuses it
    shown = runner.invoke(app, ["show", str(tmp_path / "a[b]")])  # by path (an id is a plain name)
    assert shown.exit_code == 0 and "a[b]: finished" in " ".join(shown.output.split()), shown.output


def test_cli_errors_are_one_line(runs, tmp_path):
    missing = runner.invoke(app, ["runs", "--runs", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output and "Traceback" not in missing.output
    unknown = runner.invoke(app, ["show", "nope", "--runs", str(runs)])
    assert unknown.exit_code == 1 and "no run 'nope'" in unknown.output
    corrupt = runner.invoke(app, ["show", "broken", "--runs", str(runs)])
    assert corrupt.exit_code == 0
    assert "rounds.jsonl line 2: unreadable round record" in corrupt.output
    assert " rnd " in corrupt.output and "3/3 rounds" in corrupt.output  # the other rounds still shown


def test_every_page_and_endpoint(runs):
    client = TestClient(create_dashboard(runs))
    index = client.get("/")
    assert index.status_code == 200 and 'href="/runs/tiny"' in index.text
    page = client.get("/runs/tiny")
    assert page.status_code == 200
    assert page.text.count('<tr class="round">') == ROUNDS and page.text.count("<svg") == 3
    assert page.text.count('class="point" data-series="personal"') == ROUNDS
    for r in read_run(runs / "tiny")[1]:  # the gain column: base minus shared+personal loss
        assert f"<td>{r.eval_loss_base - r.eval_loss_personal:.3f}</td>" in page.text
    assert "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', ""), "offline: no external URL"
    assert "key_seed" not in page.text and "simulation-only" not in page.text
    panel = client.get("/runs/tiny/panel")
    assert panel.headers["x-run-status"] == "finished" and "<table" in panel.text
    assert "mode shared+personal (text)" in panel.text
    assert len(client.get("/api/runs").json()) == 2
    assert len(client.get("/api/runs/tiny/rounds").json()["rounds"]) == ROUNDS
    assert client.get("/api/runs/tiny").json()["summary"]["rounds_done"] == ROUNDS
    assert "line 2" in client.get("/api/runs/broken/rounds").json()["problems"][0]
    assert client.get("/runs/nope").status_code == 404
    assert client.get("/runs/..%2F..%2Fetc").status_code == 404


def test_live_page_in_a_real_browser(runs, tmp_path):
    """Headless Chromium: charts and table render, and a new round appears without a reload."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium or ChromeDriver missing (Debian: apt-get install chromium chromium-driver); CI has them")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.coordinator.test_server import LoopbackServer

    live = runs.parent / "live-runs" / "live"  # a run in progress: 2 of 3 rounds, status running
    shutil.copytree(runs / "tiny", live)
    rounds = (live / "rounds.jsonl").read_text().splitlines()
    (live / "rounds.jsonl").write_text("\n".join(rounds[:2]) + "\n")
    info = json.loads((live / "run.json").read_text())
    # the process that wrote it has ended: as one still running, on another host (none to check)
    (live / "run.json").write_text(json.dumps({**info, "status": "running", "ended": None, "writer": None}))

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1200",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        with LoopbackServer(create_dashboard(live.parent)) as url:
            browser.get(f"{url}/runs/live")
            browser.execute_script("window.loadedOnce = true;")
            WebDriverWait(browser, 20).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "svg.chart")) == 3)
            assert len(browser.find_elements(By.CSS_SELECTOR, "tr.round")) == 2
            (live / "rounds.jsonl").write_text("\n".join(rounds) + "\n")  # round 3 ends
            (live / "run.json").write_text(json.dumps(info))
            WebDriverWait(browser, 20).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "tr.round")) == ROUNDS)
            assert browser.execute_script("return window.loadedOnce === true;"), "the page must not reload"
            points = browser.find_elements(By.CSS_SELECTOR, 'circle.point[data-series="personal"]')
            assert len(points) == ROUNDS
            shot = tmp_path / "run-page.png"
            browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert shot.stat().st_size > 10_000


def test_odd_run_folders_are_problems_not_errors_and_nothing_is_read_outside(runs, tmp_path):
    """One bad run folder listed beside a good one: every page still answers, the bad one shows its
    problem, and no link is followed out of the runs folder."""
    root = tmp_path / "runs"
    shutil.copytree(runs / "tiny", root / "tiny")
    info = json.loads((runs / "tiny" / "run.json").read_text())
    odd_infos = {
        "latin1": None,  # a byte that is not UTF-8
        "many": {**info, "config": {**info["config"], "num_users": "many"}},
        "future": {**info, "started": 1e20},
    }
    for name, content in odd_infos.items():
        shutil.copytree(runs / "tiny", root / name)
        data = b'{"run_id": "caf\xe9"}' if content is None else json.dumps(content).encode()
        (root / name / "run.json").write_bytes(data)
    shutil.copytree(runs / "tiny", root / "nan")
    rounds = (runs / "tiny" / "rounds.jsonl").read_text().splitlines()
    rounds[0] = rounds[0].replace('"train_loss":', '"train_loss": NaN, "x":', 1)
    rounds.append('{"round": ' + "9" * 5000 + "}")
    rounds.append("[" * 100_000)
    (root / "nan" / "rounds.jsonl").write_text("\n".join(rounds) + "\n")
    outside = tmp_path / "outside" / "secret"
    shutil.copytree(runs / "tiny", outside)
    (outside / "run.json").write_text(json.dumps({**info, "base": "SECRET-OUTSIDE"}))
    (root / "escape").symlink_to(outside)
    shutil.copytree(runs / "tiny", root / "linked")
    (root / "linked" / "rounds.jsonl").unlink()
    (root / "linked" / "rounds.jsonl").symlink_to("/etc/passwd")

    client = TestClient(create_dashboard(root))
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert client.get("/").status_code == 200 and "SECRET-OUTSIDE" not in client.get("/").text
    assert listed["tiny"]["status"] == "finished" and not listed["tiny"]["problems"]
    assert listed["latin1"]["status"] == "unreadable" and listed["future"]["status"] == "unreadable"
    assert "config num_users is not a count" in listed["many"]["problems"][0]
    assert listed["escape"]["status"] == "unreadable" and "symbolic link" in listed["escape"]["problems"][0]
    assert any("symbolic link" in p for p in listed["linked"]["problems"])
    assert client.get("/runs/escape").status_code == 404 and client.get("/api/runs/escape").status_code == 404
    for run in ("many", "nan", "linked"):
        assert client.get(f"/runs/{run}").status_code == 200 and client.get(f"/api/runs/{run}").status_code == 200
    problems = client.get("/api/runs/nan/rounds").json()["problems"]
    assert len(problems) == 2 and client.get("/api/runs/nan/rounds").json()["rounds"][0]["train_loss"] is None
    assert runner.invoke(app, ["runs", "--runs", str(root)]).exit_code == 0
    assert runner.invoke(app, ["show", "nan", "--runs", str(root)]).exit_code == 0


def test_unchanged_runs_are_parsed_once_and_changes_are_seen(runs, tmp_path, monkeypatch):
    from fedprefix.coordinator import runs as runs_module

    root = tmp_path / "runs"
    shutil.copytree(runs / "tiny", root / "tiny")
    for copy in range(40):  # more runs than the cache held (32): the index read all 500 of an auditor's each time
        shutil.copytree(runs / "tiny", root / f"copy{copy}")
    reads = []
    monkeypatch.setattr(runs_module, "read_run", lambda folder: reads.append(folder) or read_run(folder))
    client = TestClient(create_dashboard(root))
    for _ in range(3):
        assert client.get("/").status_code == 200 and client.get("/api/runs/tiny").status_code == 200
    assert len(reads) == 41
    for copy in range(40):
        shutil.rmtree(root / f"copy{copy}")
    reads[:] = [folder for folder in reads if folder.name == "tiny"]
    with open(root / "tiny" / "rounds.jsonl", "a") as fh:
        fh.write('{"round": "bad"}\n')  # an appended round: seen at once
    assert len(client.get("/api/runs/tiny/rounds").json()["problems"]) == 1 and len(reads) == 2
    listed = client.get("/api/runs").json()[0]
    assert len(listed["problems"]) == 1, "a caller's additions never reach the cached copy"


def test_a_runs_list_past_the_record_cache_reads_each_run_once(runs, tmp_path, monkeypatch):
    """Past CACHED_BYTES of records, each list read every run again, evicting each before its
    next turn (300 runs of 1.4 MB: 12.5 s a request, every request)."""
    root = tmp_path / "runs"
    for copy in range(5):
        shutil.copytree(runs / "tiny", root / f"copy{copy}")
    monkeypatch.setattr(runs_module, "CACHED_BYTES", 1)  # the records of one run at a time
    reads = []
    monkeypatch.setattr(runs_module, "read_run", lambda folder: reads.append(folder) or read_run(folder))
    client = TestClient(create_dashboard(root))
    for _ in range(3):
        listed = client.get("/api/runs").json()
        assert [run["rounds_done"] for run in listed] == [ROUNDS] * 5 and len(reads) == 5


def test_a_long_run_gives_pages_of_bounded_size_that_keep_its_extremes(runs, tmp_path):
    """5,000 rounds: the page lists the latest 100 rounds, labels at most 8 rounds per chart and
    draws no dots, yet the one spike in the losses stays on the line (a 60,000-round run made a
    103 MB page); `show` prints the latest 50 rounds unless told --last 0."""
    root = tmp_path / "runs"
    shutil.copytree(runs / "tiny", root / "long")
    record = read_run(root / "long")[1][0]
    spike = 2_345
    lines = [
        record.model_copy(update={"round": n, "eval_loss_personal": 9.75 if n == spike else 1.0}).model_dump_json()
        for n in range(1, 5_001)
    ]
    (root / "long" / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    page = TestClient(create_dashboard(root)).get("/runs/long").text
    assert len(page) < 200_000, len(page)
    assert page.count('<tr class="round">') == 100 and "<td>5000</td>" in page and "<td>4900</td>" not in page
    assert "The latest 100 of 5000 rounds" in " ".join(page.split())
    assert 'class="point"' not in page and page.count('class="tick">5000<') == 3  # the last label, each chart
    ticks = [int(t) for t in re.findall(r'class="tick">(\d+)</text>', page)]
    assert len(ticks) <= 3 * 8 + 3 * 5  # round labels plus the value axis' 5 labels a chart
    personal = re.search(r'data-series="personal"[^>]*points="([^"]+)"', page).group(1).split()
    assert len(personal) < 4 * 460
    tops = {float(p.split(",")[1]) for p in personal}
    assert len(tops) == 2, "the spike's height and the flat line's: the spike was kept"

    shown = runner.invoke(app, ["show", "long", "--runs", str(root)])
    assert shown.exit_code == 0 and "the latest 50 of 5000" in " ".join(shown.output.split())
    row = r"^ *(\d+) +\d+ +\d+ +\d+ +[\d.]+ "  # rnd users ok rej train ...
    table_rounds = re.findall(row, shown.output, flags=re.M)
    assert table_rounds == [str(n) for n in range(4_951, 5_001)]
    everything = runner.invoke(app, ["show", "long", "--runs", str(root), "--last", "0"])
    assert len(re.findall(row, everything.output, flags=re.M)) == 5_000
    sparks = [line for line in shown.output.splitlines() if line.startswith("eval_loss_personal")]
    assert len(sparks[0].split()[1]) <= 60 and "█" in sparks[0]  # the spike's run of rounds


def test_runs_points_one_level_down_where_the_runs_are(runs, tmp_path):
    """The command is printed whole to paste: rich had folded it mid-path past 120 columns
    (macOS's /private/var/folders/... temp paths pass them)."""
    top = tmp_path / ("n" * 80)
    shutil.copytree(runs / "tiny", top / "project" / "tiny")
    listed = runner.invoke(app, ["runs", "--runs", str(top)])
    assert listed.exit_code == 0
    assert f"fedprefix runs --runs {top / 'project'}\n" in listed.output


def _with_losses(runs, tmp_path, name: str, **losses) -> None:
    """A copy of the tiny run whose rounds all carry `losses`."""
    folder = tmp_path / name
    shutil.copytree(runs / "tiny", folder)
    lines = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    for i, record in enumerate(lines):
        record.update({k: v[i % len(v)] for k, v in losses.items()})
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_show_reads_extreme_losses_as_runs_and_the_dashboard_do(runs, tmp_path):
    """Losses of +-1e308 overflowed the sparkline's span to NaN, and a base loss of 0 divided
    by zero: `show` failed where `runs` and the dashboard read the same folder."""
    _with_losses(runs, tmp_path, "huge", eval_loss_base=[1e308, -1e308], train_loss=[-1e308, 1e308])
    _with_losses(runs, tmp_path, "zero", eval_loss_base=[0.0])
    for name in ("huge", "zero"):
        shown = runner.invoke(app, ["show", name, "--runs", str(tmp_path)])
        assert shown.exit_code == 0 and "personalization gain" in shown.output, shown.output


def test_records_json_cannot_render_and_losses_apart_by_a_subnormal_still_give_pages(runs, tmp_path):
    """NaN or 1e999 in a record's config or host made /api/runs/ID answer 500 (JSON has no NaN); a
    free-text status broke the panel's X-Run-Status header; losses 5e-324 apart divided by zero."""
    info = json.loads((runs / "tiny" / "run.json").read_text())
    for name, text in {
        "nonfinite": json.dumps({**info, "config": {**info["config"], "lr": float("nan")}})[:-1]
        + ', "host": {"x": 1e999}}',
        "arrow": json.dumps({**info, "status": "runn\u2192ing\r\nX-Evil: 1"}),
    }.items():
        shutil.copytree(runs / "tiny", tmp_path / name)
        (tmp_path / name / "run.json").write_text(text)
    _with_losses(runs, tmp_path, "subnormal", eval_loss_base=[1.5e-323, 2e-323])
    client = TestClient(create_dashboard(tmp_path))
    for run in ("nonfinite", "subnormal"):
        for path in (f"/runs/{run}", f"/runs/{run}/panel", f"/api/runs/{run}", f"/api/runs/{run}/rounds"):
            assert client.get(path).status_code == 200, path
    record = client.get("/api/runs/nonfinite").json()["run"]
    assert record["config"]["lr"] is None and record["host"] == {"x": None}
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert listed["arrow"]["status"] == "unreadable" and "status" in listed["arrow"]["problems"][0]
    assert client.get("/runs/arrow/panel").status_code == 404
    shown = runner.invoke(app, ["show", "nonfinite", "--runs", str(tmp_path), "--json"])
    assert shown.exit_code == 0 and "NaN" not in shown.output and "Infinity" not in shown.output


def test_show_takes_the_run_id_under_runs_before_a_same_named_folder_here(runs, tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()  # not a run: a folder that happens to share the id
    monkeypatch.chdir(tmp_path)
    shown = runner.invoke(app, ["show", "tiny", "--runs", str(runs)])
    assert shown.exit_code == 0 and "personalization gain" in shown.output, shown.output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["runs", "--runs", ""], "Invalid value for '--runs': an empty path"),
        (["simulate", "--out", " "], "Invalid value for '--out': an empty path"),
        (["serve", "--store", ""], "Invalid value for '--store': an empty path"),
        (["serve", "--store", "s", "--wrong-key-backoff", "nan"], "nan is not a finite number"),
        (["serve", "--store", "s", "--max-wait", "inf"], "inf is not a finite number"),
        (["simualte"], "Did you mean 'simulate'?"),
        # values past any use were taken: a server under the name "" served as --base, silently
        (["serve", "--store", "s", "--served-model-name", " "], "'--served-model-name': an empty name"),
        (["serve", "--store", "s", "--max-batch-size", "99999"], "99999 is not in the range 1<=x<=4096"),
        (["simulate", "--local-steps", "9" * 20], "Invalid value for '--local-steps'"),
        (["base", "info", "tiny-llama", "--tokens", "9" * 20], "Invalid value for '--tokens'"),
    ],
)
def test_empty_paths_and_non_finite_numbers_are_usage_errors(argv, message):
    """An empty --out wrote a whole run into the current folder; --wrong-key-backoff nan
    switched the wrong-key lockout off (NaN passes typer's min)."""
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert result.output.count("Did you mean") <= 1  # click's suggestion, not also typer's


def test_an_unreadable_round_names_its_field(runs, tmp_path):
    """The warning quoted pydantic's first line ("1 validation error for RoundRecord"), not the field."""
    shutil.copytree(runs / "tiny", tmp_path / "typed")
    rounds = (runs / "tiny" / "rounds.jsonl").read_text().splitlines()
    rounds[1] = rounds[1].replace('"replies_accepted":', '"replies_accepted": "two", "was":', 1)
    (tmp_path / "typed" / "rounds.jsonl").write_text("\n".join(rounds) + "\n")
    _, records, problems = read_run(tmp_path / "typed")
    assert len(records) == ROUNDS - 1 and len(problems) == 1, problems
    assert "line 2: unreadable round record (field replies_accepted: Input should be a valid integer" in problems[0]


def test_hostile_names_and_records_reach_no_terminal_or_page_raw(runs, tmp_path):
    """A folder name that is not UTF-8, a lone surrogate escaped in rounds.jsonl, and escape codes
    in a record (a node's error reply, say): every page answers, and no terminal gets them raw."""
    root = tmp_path / "runs"
    shutil.copytree(runs / "tiny", root / "tiny")
    shutil.copytree(runs / "tiny", root / "\udcff")  # the folder name b"\xff"
    shutil.copytree(runs / "tiny", root / "odd")
    rounds = (root / "odd" / "rounds.jsonl").read_text().splitlines()
    rounds[0] = rounds[0].replace('"rejected":[]', '"rejected":[{"node":1,"reason":"\\udcff"}]', 1)
    assert "udcff" in rounds[0]
    (root / "odd" / "rounds.jsonl").write_text("\n".join([*rounds, "[]"]) + "\n")
    info = json.loads((root / "odd" / "run.json").read_text())
    (root / "odd" / "run.json").write_text(json.dumps({**info, "base": "\x1b[2Jcleared", "error": "\x1b]0;title\x07"}))

    client = TestClient(create_dashboard(root))
    assert client.get("/").status_code == 200
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert listed["tiny"]["status"] == "finished" and listed["\ufffd"]["problems"]
    for path in ("/runs/odd", "/runs/odd/panel", "/api/runs/odd", "/api/runs/odd/rounds"):
        assert client.get(path).status_code == 200, path
    problems = client.get("/api/runs/odd/rounds").json()["problems"]
    assert "line 1: unreadable round record (text with a lone surrogate)" in problems[0]
    assert f"line {len(rounds) + 1}: unreadable round record (not a JSON object)" in problems[1]
    assert client.get("/docs").status_code == 404  # FastAPI's docs load Swagger from a CDN

    for argv in (["runs", "--runs", str(root)], ["show", "odd", "--runs", str(root)]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0 and "\x1b" not in result.output, result.output
    shown = runner.invoke(app, ["show", "odd", "--runs", str(root)])
    assert "\\x1b[2Jcleared" in shown.output  # shown, harmless


def test_unreadable_lines_past_twenty_are_counted_not_listed(runs, tmp_path):
    shutil.copytree(runs / "tiny", tmp_path / "many")
    with open(tmp_path / "many" / "rounds.jsonl", "a") as fh:
        fh.write("{}\n" * 5000)
    _, records, problems = read_run(tmp_path / "many")
    assert len(records) == ROUNDS and len(problems) == 21 and problems[-1].endswith(": 4980 more unreadable lines")


def test_show_averages_many_huge_losses_without_overflow(runs, tmp_path):
    shutil.copytree(runs / "tiny", tmp_path / "long")
    line = json.loads((runs / "tiny" / "rounds.jsonl").read_text().splitlines()[0])
    records = [{**line, "round": i, "eval_loss_base": 1e308, "train_loss": -1e308} for i in range(1, 130)]
    (tmp_path / "long" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shown = runner.invoke(app, ["show", "long", "--runs", str(tmp_path)])
    assert shown.exit_code == 0 and "eval_loss_base" in shown.output, shown.output
    from fedprefix.coordinator.dashboard.charts import line_chart

    for values in ([1e308, -1e308], [1.7e308, 1.7e308], [-1.7e308, -1.7e308]):
        svg = line_chart("loss", [1, 2], {"a": values})
        assert "nan" not in svg and "inf" not in svg, values


def test_pages_answer_loopback_names_only_and_run_no_script_but_their_own(runs):
    """DNS rebinding read every run record; the page's one script is allowed by its hash, and no
    page may be framed (the live browser test sees that script still run under the policy)."""
    client = TestClient(create_dashboard(runs, allowed_hosts=allowed_hosts("127.0.0.1")))
    page = client.get("/runs/tiny", headers={"host": "127.0.0.1:8050"})
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", page.text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    refused = client.get("/api/runs", headers={"host": "evil.example:8050"})
    assert refused.status_code == 400 and "tiny" not in refused.text and "content-security-policy" in refused.headers


def test_record_text_is_cut_and_escaped_and_answers_name_no_absolute_path(runs, tmp_path, monkeypatch):
    """A 100 KB reason made a 100 KB page (a 100 MB one, 100 MB), bidi overrides reached pages raw,
    a folder that is no run id was linked (x#y opened run x), and answers named the runs folder."""
    root = tmp_path / "runs"
    shutil.copytree(runs / "tiny", root / "odd")
    shutil.copytree(runs / "broken", root / "broken")
    shutil.copytree(runs / "tiny", root / "x#y")
    rounds = (root / "odd" / "rounds.jsonl").read_text().splitlines()
    reason = "\u202e" + "r" * 100_000
    rounds[0] = rounds[0].replace('"rejected":[]', json.dumps({"rejected": [{"node": 1, "reason": reason}]})[1:-1], 1)
    (root / "odd" / "rounds.jsonl").write_text("\n".join(rounds) + "\n")
    client = TestClient(create_dashboard(root))
    page = client.get("/runs/odd").text
    assert "\u202e" not in page and "\\u202e" in page and "(100,001 characters)" in page and len(page) < 60_000
    index = client.get("/").text
    assert 'href="/runs/x#y"' not in index and "x#y" in index and "is not a valid run id" in index
    for path in ("/", "/api/runs", "/runs/broken", "/api/runs/broken", "/api/runs/broken/rounds", "/runs/none"):
        answer = client.get(path)
        assert str(root) not in answer.text, path
    assert "broken/rounds.jsonl line 2" in client.get("/api/runs/broken/rounds").text
    monkeypatch.chdir(tmp_path)  # `--runs runs`, the default: a run named runs-b keeps its name
    shutil.copytree(runs / "broken", root / "runs-b")
    problems = TestClient(create_dashboard("runs")).get("/api/runs/runs-b/rounds").json()["problems"]
    assert problems[0].startswith("runs-b/rounds.jsonl line 2: ")


def test_a_rounds_file_too_large_to_read_is_a_problem_and_rounds_come_in_pages(runs, tmp_path, monkeypatch):
    """A 1 GB rounds.jsonl took 2.2 GB to read, and one past the memory failed the whole runs list (500)."""
    root = tmp_path / "runs"
    shutil.copytree(runs / "tiny", root / "tiny")
    shutil.copytree(runs / "tiny", root / "big")
    lines = (root / "big" / "rounds.jsonl").read_text()
    (root / "big" / "rounds.jsonl").write_text(lines * 4)
    monkeypatch.setattr(runs_module, "MAX_ROUNDS_BYTES", len(lines.encode()) + 1)
    client = TestClient(create_dashboard(root))
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert listed["tiny"]["status"] == "finished" and listed["big"]["status"] == "unreadable"
    assert "big/rounds.jsonl holds 0 MiB, more than the 0 MiB" in listed["big"]["problems"][0]
    assert client.get("/runs/big").status_code == 404
    paged = client.get("/api/runs/tiny/rounds", params={"after": 1, "limit": 1}).json()["rounds"]
    assert [r["round"] for r in paged] == [2]

    def exhausted(folder):
        raise MemoryError

    monkeypatch.setattr(runs_module, "read_run", exhausted)
    (root / "tiny" / "run.json").touch()  # changed: read again
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert "too large for the memory left" in listed["tiny"]["problems"][0]
    monkeypatch.setattr(runs_module, "MAX_INFO_BYTES", 10)  # a run.json is read whole too
    (root / "tiny" / "run.json").write_text((root / "tiny" / "run.json").read_text() + " ")
    listed = {r["id"]: r for r in client.get("/api/runs").json()}
    assert "tiny/run.json holds 0 MiB, more than the 0 MiB read here" in listed["tiny"]["problems"][0]


def _recorded_as_running(folder, writer) -> None:
    from fedprefix.coordinator.records import RUN_FILE, RunInfo

    folder.mkdir(parents=True)
    info = RunInfo(
        run_id="r", status="running", config={}, base="b", base_fingerprint="f", shared_prefix_parameters=0, started=1.0
    )
    (folder / RUN_FILE).write_text(info.model_copy(update={"writer": writer}).model_dump_json())


def test_a_run_whose_process_was_killed_reads_as_interrupted_not_running_for_ever(tmp_path):
    """The ServerApp's process killed (SIGKILL, the OOM killer) wrote no end: the run read
    "running" with no round for ever, and its page kept polling (an auditor's finding)."""
    from fedprefix.coordinator.records import this_process

    from tests.conftest import killed_writer

    dead = killed_writer()
    _recorded_as_running(tmp_path / "runs" / "dead", dead)
    _recorded_as_running(tmp_path / "runs" / "alive", this_process())
    _recorded_as_running(tmp_path / "runs" / "elsewhere", dead.model_copy(update={"host": "another-host"}))
    reused = this_process().model_copy(update={"started": this_process().started - 3600})  # the pid, not the process
    _recorded_as_running(tmp_path / "runs" / "reused", reused)
    found = {s.id: s for s in runs_module.list_runs(tmp_path / "runs")}
    for gone in ("dead", "reused"):
        assert found[gone].status == "interrupted", gone
        assert any("says running, but the process writing it" in p and "is gone" in p for p in found[gone].problems)
    assert found["alive"].status == found["elsewhere"].status == "running"  # elsewhere: this host cannot tell
    assert not found["alive"].problems
    _recorded_as_running(tmp_path / "runs" / "older", None)  # a version before `writer`: cannot tell either
    (older,) = [s for s in runs_module.list_runs(tmp_path / "runs") if s.id == "older"]
    assert older.status == "running" and "did not record its process" in older.problems[0]
    client = TestClient(create_dashboard(tmp_path / "runs"))
    assert client.get("/runs/dead/panel").headers["X-Run-Status"] == "interrupted"  # the page stops polling
    shown = CliRunner().invoke(app, ["show", str(tmp_path / "runs" / "dead")])
    assert "interrupted" in shown.output and "is gone" in shown.output


def test_a_run_folder_of_a_newer_format_is_refused_by_name(tmp_path):
    from fedprefix.coordinator.records import RunFolderError, read_info

    _recorded_as_running(tmp_path / "run", None)
    path = tmp_path / "run" / "run.json"
    path.write_text(path.read_text().replace('"format_version":1', '"format_version":2'))
    with pytest.raises(RunFolderError, match="is format 2, written by a newer fedprefix"):
        read_info(tmp_path / "run")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_dashboard_stops_cleanly_on_ctrl_c_and_sigterm(runs, sig):
    """SIGTERM (a service manager's stop) printed "aborted" and exited 130."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("fedprefix")), "dashboard", "--runs", str(runs), "--port", str(port)]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{port}/"):
            assert server.poll() is None and time.monotonic() < deadline, "the dashboard did not come up"
            time.sleep(0.2)
        server.send_signal(sig)
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0 and "aborted" not in err, err


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
