"""`fedprefix simulate` stops everything it started: interrupted mid-round by SIGINT (Ctrl-C)
or SIGTERM, no SuperLink, SuperExec, flwr-simulation, Ray daemon or ClientAppActor is left;
and the round records reach on_round as they are written."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from fedprefix.common.config import FederationConfig
from fedprefix.coordinator import run_folder, superlink
from fedprefix.coordinator.processes import TAG_VAR, alive, owned_processes, ray_token_env
from fedprefix.coordinator.records import ROUNDS_FILE, RUN_FILE, RoundRecord, RunInfo
from fedprefix.coordinator.simulate import RoundWatcher, wait_for_run

from tests.conftest import FEDPREFIX_CLI, MARK, interruptible
from tests.conftest import marked_processes as _marked


def _describe(processes) -> str:
    rows = []
    for process in processes:
        try:
            rows.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            continue
    return "\n".join(rows)


def _names(processes) -> str:
    text = []
    for process in processes:
        try:
            text.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return "\n".join(text)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_interrupted_simulation_leaves_no_process(tmp_path, sig):
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    command = [
        FEDPREFIX_CLI,
        "simulate",
        "--base",
        "tiny-llama",
        "--users",
        "2",
        "--rounds",
        "200",
        "--local-steps",
        "20",
        "--examples",
        "10",
        "--set",
        "max_length=96",
        "--out",
        str(tmp_path / "run"),
    ]
    cli = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=interruptible)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 180  # a deadline for a broken start only: 33 s seen on a loaded CI box
        while time.monotonic() < deadline and cli.poll() is None:
            ours = _marked(mark)
            seen.update({p.pid: p for p in ours})
            if "ClientAppActor" in _names(ours):  # Ray runs the nodes' training: mid-round
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no ClientAppActor came up:\n{cli.communicate(timeout=60)[0].decode()[-3000:]}")
        tags = {p.environ().get(TAG_VAR) for p in _marked(mark) if p.pid != cli.pid}
        assert len(tags) == 1 and None not in tags, "every process simulate() started carries its tag"
        seen.update({p.pid: p for p in _marked(mark)})
        names = _names(seen.values())
        for expected in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server"):
            assert expected in names
        if sig == signal.SIGINT:  # once is enough
            gcs = re.search(r"--gcs-address=(\S+)", names).group(1)
            assert "Authentication token is missing" in _join_without_token(gcs), "the run's Ray requires its token"

        cli.send_signal(sig)
        signalled = time.monotonic()
        output = cli.communicate(timeout=90)[0].decode()  # ~6 s here
        print(f"exited {time.monotonic() - signalled:.1f} s after {sig.name}; output tail:\n{output[-600:]}")
        assert cli.returncode == 130 and "aborted" in output, output[-2000:]  # the shell's code for SIGINT
        left = _marked(mark) + [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"still running after exit:\n{_describe(left)}"
        time.sleep(3)
        left = _marked(mark)
        assert not left, f"running 3 s after exit:\n{_describe(left)}"
        info = RunInfo.model_validate_json((tmp_path / "run" / RUN_FILE).read_text())
        assert info.status == "interrupted" and info.ended is not None, "the record says it was stopped"
    finally:
        _kill_all(cli, mark)


def _join_without_token(gcs: str) -> str:
    """What a Ray driver without the token says when it tries to join the cluster at `gcs`
    (Ray retries for ~20 s before it gives up: stopped at its first refusal)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    code = f"import ray; ray.init(address={gcs!r}); ray.get(ray.remote(lambda: 1).remote())"
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    said = []
    try:
        for line in iter(driver.stdout.readline, b""):  # ends when the driver exits
            said.append(line.decode(errors="replace"))
            if "Authentication token" in said[-1]:
                break
    finally:
        driver.kill()
        driver.wait()
    return "".join(said)


def _kill_all(cli: subprocess.Popen, mark: str) -> None:
    """Never leave a failed test's processes behind (a few passes: dying parents may start some)."""
    cli.kill()
    cli.wait()
    for _ in range(10):
        left = _marked(mark)
        if not left:
            return
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=1)


def _record(number: int) -> RoundRecord:
    return RoundRecord(
        round=number,
        sampled_users=[0, 1],
        replies_accepted=2,
        replies_rejected=0,
        train_loss=1.0 / number,
        eval_loss_base=2.0,
        eval_loss_shared=1.5,
        eval_loss_personal=1.0,
        shared_update_norm=0.1,
        uplink_bytes=100,
        train_seconds_sum=0.1,
        seconds=0.1,
    )


def _write_info(run_dir: Path, status: str, error: str | None = None) -> None:
    info = RunInfo(
        run_id="1",
        status=status,
        config={},
        base="tiny-llama",
        base_fingerprint="x",
        shared_prefix_parameters=0,
        started=0.0,
        error=error,
    )
    (run_dir / RUN_FILE).write_text(info.model_dump_json())


def test_rounds_reach_on_round_as_they_are_written(tmp_path):
    # A stale rounds file of an earlier run (no run.json yet) is not reported.
    (tmp_path / ROUNDS_FILE).write_text(_record(7).model_dump_json() + "\n")
    done = tmp_path / "writer-done"  # the "run" ends once everything is written, however slow the writer
    wait = f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.05)"
    process = subprocess.Popen([sys.executable, "-c", wait])
    got: list[tuple[int, int | None]] = []

    def writer():
        time.sleep(0.3)
        (tmp_path / ROUNDS_FILE).write_text("")
        _write_info(tmp_path, "running")
        for number in (1, 2, 3):
            time.sleep(0.6)
            with open(tmp_path / ROUNDS_FILE, "a") as fh:
                fh.write(_record(number).model_dump_json() + "\n")
            deadline = time.monotonic() + 60
            while number == 1 and not got and time.monotonic() < deadline:  # seen before the run can end
                time.sleep(0.05)
        with open(tmp_path / ROUNDS_FILE, "a") as fh:
            fh.write('{"round": 4, "sampled')  # a partial last line is not a round yet
        done.touch()

    thread = threading.Thread(target=writer)
    thread.start()
    status = wait_for_run(process, RoundWatcher(tmp_path, lambda r: got.append((r.round, process.poll()))))
    thread.join()
    assert status == "running" and process.returncode == 0
    assert [number for number, _ in got] == [1, 2, 3]
    assert got[0][1] is None, "round 1 is reported while the process still runs"


def test_a_failed_run_stops_the_wait_early(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_info(tmp_path, "running")
        (tmp_path / ROUNDS_FILE).write_text(_record(1).model_dump_json() + "\n")
        threading.Timer(0.5, lambda: _write_info(tmp_path, "failed", "ValueError: boom")).start()
        got = []
        start = time.monotonic()
        assert wait_for_run(process, RoundWatcher(tmp_path, got.append)) == "failed"
        assert time.monotonic() - start < 5 and process.poll() is None
        assert [r.round for r in got] == [1]
    finally:
        process.kill()
        process.wait()


DAEMON = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as stubborn as Ray's daemons under load
if os.fork() == 0:
    os.setsid()  # a new session: out of our process group, as Flower's SuperExec does
    if os.fork() == 0:
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def test_owned_processes_stops_daemonized_descendants(tmp_path):
    pid_file = tmp_path / "daemon.pid"
    start = time.monotonic()
    with owned_processes() as owned:
        parent = owned.popen([sys.executable, "-c", DAEMON, str(pid_file)], env=dict(os.environ))
        while not pid_file.is_file() or not pid_file.read_text():
            time.sleep(0.05)
        daemon = psutil.Process(int(pid_file.read_text()))
        assert daemon.environ()[TAG_VAR] == owned.tag
    assert parent.poll() is not None
    assert not alive([daemon]), "the daemon in a session of its own, ignoring SIGTERM, is killed too"
    assert time.monotonic() - start < 15


OWNER = """
import os, sys, time
from fedprefix.coordinator.processes import owned_processes
with owned_processes(temp_folder=sys.argv[3]) as owned:
    owned.popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=dict(os.environ))
    time.sleep(600)
"""


def test_a_process_killed_outright_has_its_processes_stopped_by_its_watchdog(tmp_path):
    """SIGKILL (or the OOM killer) runs no cleanup: `fedprefix simulate` killed so left the
    SuperLink and the SuperExec running for good, and its temp folder (Ray's logs in it). Its
    watchdog stops them and removes the folder."""
    pid_file, temp_folder = tmp_path / "daemon.pid", tmp_path / "fedprefix-sim-x"
    (temp_folder / "ray" / "session_1").mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", OWNER, DAEMON, str(pid_file), str(temp_folder)])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon = psutil.Process(int(pid_file.read_text()))
        owner.kill()
        owner.wait()
        _, left = psutil.wait_procs([daemon], timeout=20)  # the watchdog looks each second; SIGKILL after 3 s
        assert not alive(left), "the daemon of a killed owner is stopped"
        deadline = time.monotonic() + 10
        while temp_folder.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not temp_folder.exists()
    finally:
        owner.kill()
        if pid_file.is_file() and pid_file.read_text():
            with contextlib.suppress(psutil.Error):
                psutil.Process(int(pid_file.read_text())).kill()


def test_sigterm_interrupts_like_ctrl_c_while_owned():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with owned_processes():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_each_run_keeps_its_nodes_stores_in_its_own_folder(tmp_path, monkeypatch):
    """A second run into the same folder, or another run, never starts from an earlier run's prefixes."""
    from fedprefix.common.config import FederationConfig
    from fedprefix.coordinator import simulate as simulate_module

    run_dir = tmp_path / "runs" / "demo"
    config = FederationConfig(run_dir=str(run_dir))
    assert Path(config.node_store_root) == run_dir / "stores"
    assert FederationConfig(run_dir=str(run_dir), store_root="/elsewhere").node_store_root == "/elsewhere"

    def stop_here(*args, **kwargs):
        raise RuntimeError("stop before Flower starts")

    monkeypatch.setattr(simulate_module, "write_app", stop_here)
    stores = run_dir / "stores"
    stores.mkdir(parents=True)
    (stores / "alice.fpx").write_bytes(b"a folder no simulation made: never removed")
    with pytest.raises(simulate_module.SimulationError, match="no simulation made it"):
        simulate_module.simulate(config)
    assert (stores / "alice.fpx").is_file()
    (stores / "alice.fpx").unlink()
    stores.rmdir()
    with pytest.raises(RuntimeError, match="stop before Flower"):  # the first run makes and marks it
        simulate_module.simulate(config)
    (stores / "user001").mkdir()
    (stores / "user001" / "user001.fpx").write_bytes(b"an earlier run's prefix")
    outputs = ("run.json", "rounds.jsonl", "shared_prefix.safetensors", "flower.log")  # a shared run's, say
    for name in outputs:
        (run_dir / name).write_bytes(b"an earlier run's")
    with pytest.raises(RuntimeError, match="stop before Flower"):  # a rerun starts afresh, even one that fails
        simulate_module.simulate(config)
    assert not (stores / "user001").exists() and (stores / run_folder.SIMULATION_MARK).is_file()
    assert not any((run_dir / name).exists() for name in outputs)  # never passed off as this run's
    mine = tmp_path / "mine"
    (mine / "user001").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="stop before Flower"):  # a store root the user chose is never removed
        simulate_module.simulate(FederationConfig(run_dir=str(run_dir), store_root=str(mine)))
    assert (mine / "user001").is_dir()


def test_a_run_that_accepted_no_reply_in_any_round_is_an_error():
    from fedprefix.coordinator.records import Rejection, nothing_accepted

    assert nothing_accepted([_record(1), _record(2)]) is None
    rejected = [
        _record(n).model_copy(
            update={"replies_accepted": 0, "replies_rejected": 2, "rejected": [Rejection(node=7, reason="no rows")]}
        )
        for n in (1, 2)
    ]
    assert "no node's reply was accepted in any round (the first: node 7: no rows)" == nothing_accepted(rejected)
    assert nothing_accepted([rejected[0], _record(2)]) is None  # one round that taught something is a run


def test_a_run_stopped_from_outside_or_teaching_nothing_is_not_left_running_or_finished(tmp_path):
    from fedprefix.coordinator.records import end_unfinished, read_run

    _write_info(tmp_path, "running")
    end_unfinished(tmp_path, "interrupted", "stopped by the user")
    info = read_run(tmp_path)[0]
    assert info.status == "interrupted" and info.error == "stopped by the user" and info.ended is not None
    _write_info(tmp_path, "finished")
    end_unfinished(tmp_path, "failed", "late")  # an ended run keeps its end
    assert read_run(tmp_path)[0].status == "finished"
    end_unfinished(tmp_path, "failed", "no reply accepted", ended=("finished",))
    assert read_run(tmp_path)[0].status == "failed"
    end_unfinished(tmp_path / "nowhere", "failed", "nothing started")  # no run.json: nothing to do


def test_a_folder_no_run_made_is_refused_and_left_as_it_was(tmp_path):
    """A run writes data/, run.json, rounds.jsonl and more into its folder: never into someone's."""
    from fedprefix.coordinator import simulate as simulate_module

    project = tmp_path / "project"
    (project / "data" / "user000").mkdir(parents=True)
    (project / "data" / "user000" / "train.jsonl").write_text('{"prompt": "mine", "completion": "x"}\n')
    (project / "run.json").write_text('{"tool": "other"}')  # not a run record of ours
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    for folder in (project, tmp_path):
        with pytest.raises(simulate_module.SimulationError, match="holds files that no fedprefix run made"):
            run_folder.claim_run_folder(FederationConfig(run_dir=str(folder)))
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    for fine in ("new", "empty"):  # claimed: marked before a run writes its data there, so its rerun may
        run_folder.claim_run_folder(FederationConfig(run_dir=str(tmp_path / fine)))
        (tmp_path / fine / "data").mkdir()
        run_folder.claim_run_folder(FederationConfig(run_dir=str(tmp_path / fine)))


def test_a_node_process_that_died_is_named_beside_what_the_rounds_recorded(tmp_path, monkeypatch, caplog):
    """A node's Ray actor killed (the OOM killer, say) shows in the rounds only as nodes that did
    not reply; the run's error, its record and a warning say that a node's process died."""
    from fedprefix.coordinator import simulate as simulate_module
    from fedprefix.coordinator.records import Rejection, nothing_accepted, read_run

    quiet = tmp_path / "quiet.log"
    quiet.write_bytes(b"INFO: round 1\n\xff not UTF-8\n")
    assert simulate_module.died_node_note(quiet) == "" == simulate_module.died_node_note(tmp_path / "none.log")
    run_dir = tmp_path / "run"
    rejected = _record(1).model_copy(
        update={"replies_accepted": 0, "rejected": [Rejection(node=3, reason="secure aggregation halted")]}
    )

    def killed_run(config, *args):  # what the ServerApp leaves: its rounds, and the run failed as none accepted
        (run_dir / "flower.log").write_text("ERROR: ray.exceptions.ActorDiedError: The actor died unexpectedly\n")
        _write_info(run_dir, "failed", error=nothing_accepted([rejected]))
        (run_dir / ROUNDS_FILE).write_text(rejected.model_dump_json() + "\n")
        return 0

    monkeypatch.setattr(simulate_module, "_run_federation", killed_run)
    with pytest.raises(simulate_module.SimulationError) as caught:
        simulate_module.simulate(FederationConfig(num_users=2, run_dir=str(run_dir)))
    message = str(caught.value)
    assert "node 3: secure aggregation halted" in message and "a node's process died during the run" in message
    assert "--users-per-round" in message and "ActorDiedError" in caplog.text
    info = read_run(run_dir)[0]
    assert info.status == "failed" and "a node's process died" in info.error


def test_a_server_app_that_ended_without_recording_its_end_fails_the_run_by_name(tmp_path, monkeypatch):
    """The ServerApp's process killed (the OOM killer) left run.json "running": simulate said
    "the federation running: no reason recorded", and the record stayed "running" for ever."""
    from fedprefix.coordinator import simulate as simulate_module
    from fedprefix.coordinator.records import read_run

    run_dir = tmp_path / "run"

    def killed_server_app(config, *args):
        _write_info(run_dir, "running")
        return 0

    monkeypatch.setattr(simulate_module, "_run_federation", killed_server_app)
    with pytest.raises(simulate_module.SimulationError, match="the ServerApp ended without recording its end"):
        simulate_module.simulate(FederationConfig(num_users=2, run_dir=str(run_dir)))
    info = read_run(run_dir)[0]
    assert info.status == "failed" and "without recording its end" in info.error


@contextlib.contextmanager
def _held_elsewhere(run_dir: Path):
    """RUN_DIR's lock held by another process (this one's own holds are counted, not refused)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = "import sys, time; from filelock import FileLock; held = FileLock(sys.argv[1]); held.acquire()"
    code += "; print(1, flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir / run_folder.RUN_LOCK)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"1"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_into_a_folder_in_use_is_refused_before_it_touches_it(tmp_path, monkeypatch):
    """A second terminal's run into the same --out emptied the first run's record and node stores
    under it, and reported its own run, mixed with the first one's nodes, as finished."""
    from fedprefix.coordinator import simulate as simulate_module

    run_dir = tmp_path / "run"
    started = []
    monkeypatch.setattr(simulate_module, "_run_federation", lambda *args: started.append(1) or 0)
    config = FederationConfig(num_users=2, run_dir=str(run_dir))
    run_folder.claim_run_folder(config)
    _write_info(run_dir, "running")
    before = (run_dir / RUN_FILE).read_bytes()
    with _held_elsewhere(run_dir):  # the first run, still going
        with pytest.raises(simulate_module.SimulationError, match="another run is using .*give another --out"):
            simulate_module.simulate(config)
    assert not started and (run_dir / RUN_FILE).read_bytes() == before


def test_a_deployment_run_into_an_earlier_runs_folder_starts_without_its_shared_prefix(tmp_path):
    """`flwr run` on a Deployment Engine writes its folder through RunRecorder.start alone."""
    from fedprefix.coordinator.records import RunInfo, RunRecorder, load_shared_prefix, read_run

    (tmp_path / "shared_prefix.safetensors").write_bytes(b"an earlier shared run's")
    (tmp_path / "rounds.jsonl").write_text('{"round": 1}\n')
    info = RunInfo(
        run_id="r", status="running", config={}, base="b", base_fingerprint="f", shared_prefix_parameters=0, started=1.0
    )
    RunRecorder.start(tmp_path, info)
    with pytest.raises(Exception, match="no shared_prefix.safetensors"):
        load_shared_prefix(tmp_path)
    assert read_run(tmp_path)[1] == []


def test_node_stores_removal_stopped_midway_leaves_a_folder_the_next_run_may_empty(tmp_path, monkeypatch):
    """Ctrl-C inside the removal of an earlier run's node stores: the folder keeps its mark
    (removed last), so the rerun is not refused as "no simulation made it" and empties it."""

    config = FederationConfig(run_dir=str(tmp_path / "run"))
    stores = Path(config.node_store_root)
    for user in ("user000", "user001", "user002"):
        (stores / user).mkdir(parents=True)
        (stores / user / f"{user}.fpx").write_bytes(b"an earlier run's prefix")
    (stores / run_folder.SIMULATION_MARK).write_text("made by a simulation\n")
    real_rmtree = run_folder.shutil.rmtree
    removed = []

    def interrupted_after_one(path, *args, **kwargs):
        if removed:
            raise KeyboardInterrupt
        removed.append(path)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(run_folder.shutil, "rmtree", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_folder.remove_node_stores(stores)
    monkeypatch.setattr(run_folder.shutil, "rmtree", real_rmtree)
    assert len(removed) == 1 and (stores / run_folder.SIMULATION_MARK).is_file()
    run_folder.check_run_folder(config)  # not refused
    run_folder.remove_node_stores(stores)
    assert not stores.exists()
    run_folder.remove_node_stores(stores)  # nothing there: nothing to do


def test_a_ray_of_ours_gets_a_fresh_token_and_an_owners_or_a_clusters_setting_is_kept():
    first, second = ray_token_env({}), ray_token_env({})
    assert first["RAY_AUTH_MODE"] == "token" and len(first["RAY_AUTH_TOKEN"]) == 64
    assert first["RAY_AUTH_TOKEN"] != second["RAY_AUTH_TOKEN"]
    assert ray_token_env({"RAY_AUTH_TOKEN": "mine"})["RAY_AUTH_TOKEN"] == "mine"
    assert ray_token_env({"RAY_AUTH_MODE": "disabled"}) == {}  # the owner's choice
    assert ray_token_env({"RAY_ADDRESS": "10.0.0.5:6379"}) == {}  # a cluster's: it may take no token


def test_a_proxy_setting_does_not_take_the_runs_loopback_traffic(monkeypatch, tmp_path):
    """Behind a proxy (HTTP_PROXY set), the SuperLink's health check and Flower's own loopback
    gRPC went to the proxy: every simulation failed with "flower-superlink did not start"."""
    port, stop = _answering_health()
    try:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "intranet.example")
        monkeypatch.setenv("no_proxy", "lab.example")
        assert superlink._healthy(port)
    finally:
        stop()


def _answering_health() -> tuple[int, Callable[[], None]]:
    """A loopback HTTP server answering GET /health with 200, as a SuperLink does: (its port, its stop)."""
    import http.server

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server.shutdown


def test_a_run_folder_and_its_lock_are_the_owners_under_any_umask(tmp_path):
    """Under umask 0 the run folder was 0777 (and its data/ and stores/ in it): another local user
    could swap a node's data or store folder before a rerun."""
    config = FederationConfig(num_users=2, run_dir=str(tmp_path / "run"))
    old = os.umask(0)
    try:
        run_folder.claim_run_folder(config)
        with run_folder.run_folder_lock(Path(config.run_dir)):
            lock = Path(config.run_dir) / run_folder.RUN_LOCK
            assert lock.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert Path(config.run_dir).stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("other", ["superlink", "silent"])
def test_a_superlink_whose_port_another_program_took_starts_again_on_another(monkeypatch, tmp_path, other):
    """free_port() closes its socket before the SuperLink binds: another user's SuperLink taking
    that port meanwhile answered this run's health check, and this run's app ran there, as them;
    a program that answers nothing there failed the run ("flower-superlink exited with code 1")."""
    import socket

    if other == "superlink":  # answers /health as a SuperLink does
        taken, stop = _answering_health()
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken, stop = listener.getsockname()[1], listener.close
    ports = iter([taken])
    real_free_port = superlink.free_port
    monkeypatch.setattr(superlink, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        with superlink.local_superlink(tmp_path / "flwr-home", tmp_path / "flower.log") as port:
            assert port != taken
            assert f"127.0.0.1:{port}" in (tmp_path / "flwr-home" / "config.toml").read_text()  # where `flwr run` goes
    finally:
        stop()
    assert "address already in use" in (tmp_path / "flower.log").read_text()


def test_a_killed_process_counts_as_stopped_once_it_is_a_zombie():
    """Killed processes whose parents were killed too wait to be reaped: stopping a finished run
    waited for that, seconds per run (psutil's wait_procs)."""
    from fedprefix.coordinator.processes import wait_gone

    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nif os.fork() == 0: os._exit(0)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(parent.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.02)
        (zombie,) = children  # exited, never reaped: its parent sleeps
        started = time.monotonic()
        assert wait_gone([zombie], timeout=20) == [] and time.monotonic() - started < 5
    finally:
        parent.kill()
        parent.wait()


def test_flower_processes_start_under_any_proxy_setting_and_output_encoding(monkeypatch, tmp_path):
    """A SOCKS proxy (ALL_PROXY) failed `flwr run` before its first request (httpx wants a package
    for SOCKS, also for loopback), and PYTHONIOENCODING=ascii (or a Latin-1 locale) failed it on
    Flower's box-drawing characters: every simulate ended "the ServerApp ended without recording"."""

    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    monkeypatch.setenv("https_proxy", "socks5h://127.0.0.1:1080")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "intranet.example")
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")
    flower_like = "import httpx; httpx.Client(); print('\\u251c\\u2500\\u2500 Sampling')"
    done = subprocess.run(
        [sys.executable, "-c", flower_like], env=superlink.flower_env(tmp_path), capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert done.stdout.decode("utf-8") == "\u251c\u2500\u2500 Sampling\n"
    assert superlink.flower_env(tmp_path)["HF_HUB_OFFLINE"] == "1"  # a hub base was fetched before the run


def test_a_python_whose_path_has_a_space_is_refused_at_once_by_name(monkeypatch, tmp_path):
    """Ray runs its workers through `bash -c` with the interpreter's path unquoted: a checkout in
    "~/My Projects" failed every node after some 6 minutes, saying only that worker startup failed."""
    from fedprefix.coordinator import simulate as simulate_module

    monkeypatch.setattr(simulate_module.sys, "executable", "/home/me/My Projects/fedprefix/.venv/bin/python")
    with pytest.raises(simulate_module.SimulationError, match="holds ' ', which Ray's workers cannot start from"):
        simulate_module.simulate(FederationConfig(num_users=2, run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    superlink.check_python_path("/home/me/projets/é/.venv/bin/python")  # what a shell takes as it is


def test_a_round_that_could_not_be_written_leaves_no_part_line_to_glue_the_next_one_to(tmp_path, monkeypatch):
    """A full disk cut a round's line short; the next round's line then joined it, losing both."""
    from fedprefix.coordinator import records
    from fedprefix.coordinator.records import RunRecorder, read_run

    info = RunInfo(
        run_id="r", status="running", config={}, base="b", base_fingerprint="f", shared_prefix_parameters=0, started=1.0
    )
    recorder = RunRecorder.start(tmp_path, info)
    recorder.append_round(_record(1))
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        recorder.append_round(_record(2))
    monkeypatch.undo()
    recorder.append_round(_record(3))
    _, rounds, problems = read_run(tmp_path)
    assert [r.round for r in rounds] == [1, 3] and not problems


def test_a_second_cli_run_into_a_folder_in_use_is_refused_before_it_writes_its_data(tmp_path, monkeypatch):
    """The CLI wrote the personas' data into the folder before simulate() took its lock: a second
    terminal's run replaced the data a running run's nodes read (a reviewer's finding)."""
    from fedprefix.coordinator import cli
    from fedprefix.coordinator.cli import main as cli_main

    out = tmp_path / "run"
    args = ["fedprefix", "simulate", "--base", "tiny-llama", "--users", "2", "--rounds", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setitem(cli_main._state, "debug", False)
    with _held_elsewhere(out):  # the first run, still going
        with pytest.raises(SystemExit) as exit_:
            cli.run()
    assert exit_.value.code == 1 and not (out / "data").exists()
    assert sorted(p.name for p in out.iterdir()) == [run_folder.RUN_LOCK]
    run_folder.check_run_folder(FederationConfig(run_dir=str(out)))  # the lock file alone: a folder a run may use


def test_a_run_that_ends_unrecorded_names_the_last_error_flowers_log_holds(tmp_path):
    """Flower's or Ray's processes failing before the run could record why (a SOCKS proxy, an
    unwritable TMPDIR) left only "the ServerApp ended without recording its end; see flower.log"."""
    from fedprefix.coordinator.simulate import last_error

    log = tmp_path / "flower.log"
    assert last_error(log) == ""  # no log
    log.write_bytes(
        b"\x1b[92mINFO \x1b[0m:      Starting Flower SuperLink\n"
        b"Traceback (most recent call last):\n"
        b'  File "httpx/_transports/default.py", line 156, in __init__\n'
        b"ImportError: Using SOCKS proxy, but the 'socksio' package is not installed.\n"
        b"\x1b[92mINFO \x1b[0m:      SuperExec terminated gracefully.\n"
    )
    assert last_error(log) == (
        ", last error in flower.log: ImportError: Using SOCKS proxy, but the 'socksio' package is not installed."
    )
    log.write_bytes(b"\xe2\x94\x82 PermissionError: [Errno 13] Permission denied: '/x/ray' \x1b]0;t\x07 \xe2\x94\x82\n")
    expected = ", last error in flower.log: PermissionError: [Errno 13] Permission denied: '/x/ray' \\x1b]0;t\\x07"
    assert last_error(log) == expected  # no escape code reaches the terminal


def test_a_full_disk_during_a_run_names_where_the_run_was_writing(tmp_path, monkeypatch):
    """A round record or log line that could not be written (no file named), then run.json that
    could not say so either: the CLI said only "OSError: [Errno 28] No space left on device"."""
    import errno

    from fedprefix.coordinator import simulate as simulate_module

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(simulate_module, "_run_federation", disk_full)
    monkeypatch.setattr(simulate_module, "end_unfinished", disk_full)
    run_dir = tmp_path / "run"
    with pytest.raises(run_folder.SimulationError) as caught:
        simulate_module.simulate(FederationConfig(num_users=2, base="tiny-llama", run_dir=str(run_dir)))
    assert f"the run failed writing to its run folder {run_dir.resolve()} or the temp folder" in str(caught.value)
    assert str(caught.value).endswith(": No space left on device")
